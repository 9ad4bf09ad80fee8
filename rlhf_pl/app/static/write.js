// The "Write a demonstration" page: an editor of turns with model suggestions for assistant turns.
// State lives in `state.turns`; render() rebuilds the turn list from it. Text from models and people
// is only ever put in the page with textContent / value (rlhf.el), never as markup.
"use strict";

(() => {
  const editor = document.getElementById("editor");
  const turnsBox = document.getElementById("turns");
  const titleInput = document.getElementById("demo-title");
  const statusLine = document.getElementById("save-status");
  const kInput = document.getElementById("suggest-k");
  const saveButton = document.getElementById("save-demo");
  const deleteButton = document.getElementById("delete-demo");

  const limits = {
    kMax: Number(editor.dataset.kMax) || 1,
    kDefault: Number(editor.dataset.kDefault) || 1,
    maxChars: Number(editor.dataset.maxChars) || 4000,
    maxTurns: Number(editor.dataset.maxTurns) || 64,
    hasWorker: editor.dataset.hasWorker === "yes",
  };
  const ROLE_NAMES = { system: "System", user: "User", assistant: "Assistant" };

  // A turn: {role, content, suggestion (the text it started from, or null), chosen (index in offered),
  //          offered (suggestions shown), suggesting (waiting for them), saved ({source, edit_distance}
  //          as the server stored it, or null once edited)}
  const state = { id: editor.dataset.demoId ? Number(editor.dataset.demoId) : null, createKey: null,
                  creating: null, turns: [], saving: false };

  const newTurn = (role, content = "") =>
    ({ role, content, suggestion: null, chosen: null, offered: [], suggesting: false, saved: null });

  function provenanceText(turn) {
    if (turn.role !== "assistant") return "";
    if (turn.saved) {
      return turn.saved.source === "suggestion"
        ? `from suggestion, ${turn.saved.edit_distance} chars edited` : "written from scratch";
    }
    return turn.suggestion !== null ? "from suggestion (not saved yet)" : "written from scratch (not saved yet)";
  }

  function showProvenance(i) {
    const line = turnsBox.querySelector(`[data-testid="provenance-${i}"]`);
    if (!line) return;
    line.textContent = provenanceText(state.turns[i]);
    line.classList.toggle("pending", !state.turns[i].saved);
  }

  function button(testid, label, onClick, cls = "secondary") {
    const node = rlhf.el("button", { type: "button", class: cls, "data-testid": testid, id: testid }, label);
    node.addEventListener("click", onClick);
    return node;
  }

  function renderTurn(turn, i) {
    const box = rlhf.el("div", { class: `turn ${turn.role}`, "data-testid": `turn-box-${i}`, "data-role": turn.role });
    const head = rlhf.el("div", { class: "head" });
    head.append(rlhf.el("span", { class: "role", "data-testid": `role-${i}` }, `${i} · ${ROLE_NAMES[turn.role]}`),
                rlhf.el("span", { class: "spacer" }));
    if (turn.role === "assistant") {
      const suggest = button(`suggest-${i}`, turn.suggesting ? "Suggesting…" : "Suggest", () => suggestFor(i));
      suggest.disabled = turn.suggesting || !limits.hasWorker;
      if (!limits.hasWorker) suggest.title = "this app serves no model";
      head.append(suggest);
      if (turn.suggestion !== null) head.append(button(`scratch-${i}`, "Write from scratch", () => fromScratch(i)));
    }
    head.append(button(`remove-${i}`, "Remove", () => removeTurn(i)));
    box.append(head);

    const area = rlhf.el("textarea", { "data-testid": `turn-${i}`, id: `turn-${i}`, rows: "3",
                                       "aria-label": `turn ${i} (${turn.role})` });
    area.value = turn.content;
    area.addEventListener("input", () => {
      turn.content = area.value;
      turn.saved = null;  // the stored edit distance no longer describes this text
      showProvenance(i);
      statusLine.textContent = "Unsaved changes";
    });
    box.append(area);
    box.append(rlhf.el("div", { class: "provenance", "data-testid": `provenance-${i}` }));

    if (turn.offered.length) {
      const list = rlhf.el("div", { class: "suggestions", "data-testid": `suggestions-${i}` });
      turn.offered.forEach((text, j) => {
        const item = rlhf.el("div", { class: "suggestion" + (turn.chosen === j ? " chosen" : "") });
        item.append(rlhf.el("p", { class: "text", "data-testid": `suggestion-${i}-${j}` }, text || "(empty)"),
                    button(`insert-${i}-${j}`, "Insert", () => insertSuggestion(i, j)));
        list.append(item);
      });
      box.append(list);
    }
    return box;
  }

  function render() {
    turnsBox.replaceChildren(...state.turns.map(renderTurn));
    state.turns.forEach((_, i) => showProvenance(i));
    deleteButton.hidden = state.id === null;
    document.getElementById("editor-heading").textContent =
      state.id === null ? "New demonstration" : `Demonstration ${state.id}`;
  }

  function focusTurn(i) {
    const area = document.getElementById(`turn-${i}`);
    if (area) area.focus();
  }

  function addTurn(role) {
    if (state.turns.length >= limits.maxTurns) {
      rlhf.flash(`A demonstration has at most ${limits.maxTurns} turns.`);
      return;
    }
    if (role === "system") {
      if (state.turns.length && state.turns[0].role === "system") {
        rlhf.flash("There is a system turn already (turn 0); a system turn can only be the first turn.");
        return;
      }
      state.turns.unshift(newTurn("system"));
      render();
      focusTurn(0);
      return;
    }
    state.turns.push(newTurn(role));
    render();
    focusTurn(state.turns.length - 1);
  }

  function removeTurn(i) {
    state.turns.splice(i, 1);
    statusLine.textContent = "Unsaved changes";
    render();
  }

  function insertSuggestion(i, j) {
    const turn = state.turns[i];
    turn.content = turn.offered[j];
    turn.suggestion = turn.offered[j];
    turn.chosen = j;
    turn.saved = null;
    statusLine.textContent = "Unsaved changes";
    render();
    focusTurn(i);
  }

  function fromScratch(i) {
    const turn = state.turns[i];
    Object.assign(turn, { content: "", suggestion: null, chosen: null, saved: null });
    render();
    focusTurn(i);
  }

  // The demonstration's id, made on first need (a suggestion or a save); one key per attempt, so a
  // retried request after a lost answer gets the same demonstration.
  async function ensureDemo() {
    if (state.id !== null) return state.id;
    if (!state.creating) {
      state.createKey = state.createKey || rlhf.key();
      state.creating = rlhf.api("POST", "/api/demos", { key: state.createKey, title: titleInput.value.trim() })
        .then((made) => {
          state.id = made.id;
          state.createKey = null;
          history.replaceState(null, "", `/write?d=${made.id}`);
          render();
          refreshList().catch((err) => rlhf.flash(err.message));
          return made.id;
        })
        .finally(() => { state.creating = null; });
    }
    return state.creating;
  }

  async function suggestFor(i) {
    const turn = state.turns[i];
    if (i === 0 || state.turns[i - 1].role !== "user") {
      rlhf.flash(`A suggestion answers the conversation so far, which must end with a user turn: add one before turn ${i}.`);
      return;
    }
    const k = Math.max(1, Math.min(limits.kMax, Math.round(Number(kInput.value) || limits.kDefault)));
    kInput.value = k;
    turn.suggesting = true;
    render();
    try {
      const id = await ensureDemo();
      const messages = state.turns.slice(0, i).map((t) => ({ role: t.role, content: t.content }));
      const answer = await rlhf.api("POST", `/api/demos/${id}/suggestions`, { messages, k });
      turn.offered = answer.suggestions;
      turn.chosen = null;
      rlhf.flash("");
    } catch (err) {
      rlhf.flash(err.message);
    } finally {
      turn.suggesting = false;
      render();
    }
  }

  // Take the server's view of a demonstration (after loading or saving); suggestions shown stay.
  function apply(demo) {
    state.id = demo.id;
    titleInput.value = demo.title || "";
    const previous = state.turns;
    state.turns = demo.messages.map((m, i) => {
      const turn = newTurn(m.role, m.content);
      turn.suggestion = m.suggestion;
      turn.saved = { source: m.source, edit_distance: m.edit_distance };
      const before = previous[i];
      if (before && before.role === m.role) {
        turn.offered = before.offered;
        turn.chosen = before.chosen;
      }
      return turn;
    });
    render();
  }

  async function save() {
    if (state.saving) return;  // a double click saves once (and PUT replaces: a repeat stores the same)
    state.saving = true;
    saveButton.disabled = true;
    statusLine.textContent = "Saving…";
    try {
      const id = await ensureDemo();
      const messages = state.turns.map((t) => ({
        role: t.role, content: t.content, suggestion: t.role === "assistant" ? t.suggestion : null,
      }));
      const stored = await rlhf.api("PUT", `/api/demos/${id}`, { messages, title: titleInput.value.trim() });
      apply(stored);
      statusLine.textContent = `Saved at ${new Date().toLocaleTimeString()}`;
      rlhf.flash("");
      await refreshList();
    } catch (err) {
      statusLine.textContent = "Not saved";
      rlhf.flash(err.message);
    } finally {
      state.saving = false;
      saveButton.disabled = false;
    }
  }

  async function remove() {
    if (state.id === null || !window.confirm("Delete this demonstration?")) return;
    try {
      await rlhf.api("DELETE", `/api/demos/${state.id}`);
      window.location = "/write";
    } catch (err) {
      rlhf.flash(err.message);
    }
  }

  async function refreshList() {
    const { demos } = await rlhf.api("GET", "/api/demos");
    const list = document.getElementById("demo-list");
    list.replaceChildren(...demos.map((demo) => {
      const item = rlhf.el("li", { "data-id": String(demo.id), class: demo.id === state.id ? "current" : "" });
      item.append(rlhf.el("a", { href: `/write?d=${demo.id}`, "data-testid": `demo-link-${demo.id}` },
                          demo.title || "Untitled demonstration"),
                  rlhf.el("span", { class: "muted" }, `${demo.turns} turns, ${demo.from_suggestion} from suggestions`));
      return item;
    }));
  }

  async function load() {
    if (state.id === null) {
      render();
      return;
    }
    try {
      apply(await rlhf.api("GET", `/api/demos/${state.id}`));
    } catch (err) {
      rlhf.flash(err.message);
    }
  }

  document.getElementById("add-user").addEventListener("click", () => addTurn("user"));
  document.getElementById("add-assistant").addEventListener("click", () => addTurn("assistant"));
  document.getElementById("add-system").addEventListener("click", () => addTurn("system"));
  document.getElementById("new-demo").addEventListener("click", () => { window.location = "/write"; });
  saveButton.addEventListener("click", save);
  deleteButton.addEventListener("click", remove);
  titleInput.addEventListener("input", () => { statusLine.textContent = "Unsaved changes"; });
  load();
})();
