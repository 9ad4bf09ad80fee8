// The Rank page: one task at a time; its completions as a list of tie groups, best first.
// Drag and drop (HTML5 DnD): drop a completion onto a group to tie it with that group, onto a gap between
// groups to give it a place of its own there. Keyboard on a focused completion: ArrowUp / ArrowDown move
// it one place (as its own group), "t" ties it with the group above, "u" unties it.
// Model and user text only ever goes into the page through textContent (rlhf.el).
"use strict";

(() => {
  const ROLES = new Set(["system", "user", "assistant"]);
  let task = null;       // {id, prompt, completions, k, queue}
  let groups = [];       // [[2], [0, 3], [1]]: completion indices, best group first
  let key = null;        // idempotency key of this attempt (one per task shown)
  let pristine = true;   // nothing moved yet: "all bad" then sends no ranking (stored as an all-tie)
  let dragged = null;    // index of the completion being dragged
  let busy = false;

  const $ = (id) => document.getElementById(id);
  const letter = (i) => (task.k <= 26 ? String.fromCharCode(65 + i) : String(i + 1));
  const groupOf = (i) => groups.findIndex((group) => group.includes(i));

  // Move completion i to a group ({group: g}: tie with it) or a gap ({gap: g}: a new group before group g).
  function move(i, target) {
    const next = groups.map((group) => group.filter((x) => x !== i));
    if ("group" in target) next[target.group].push(i); else next.splice(target.gap, 0, [i]);
    groups = next.filter((group) => group.length);
    pristine = false;
    render();
    const item = document.querySelector(`[data-testid="completion-${i}"]`);
    if (item) item.focus();
  }

  function up(i) {
    const g = groupOf(i);
    if (groups[g].length > 1) move(i, { gap: g });         // out of its tie, just above it
    else if (g > 0) move(i, { gap: g - 1 });               // above the group above
  }

  function down(i) {
    const g = groupOf(i);
    if (groups[g].length > 1) move(i, { gap: g + 1 });     // out of its tie, just below it
    else if (g < groups.length - 1) move(i, { gap: g + 2 }); // below the group below
  }

  function tie(i) {
    const g = groupOf(i);
    if (g > 0) move(i, { group: g - 1 });
  }

  function untie(i) {
    const g = groupOf(i);
    if (groups[g].length > 1) move(i, { gap: g + 1 });
  }

  function onKey(event, i) {
    if (busy || event.altKey || event.ctrlKey || event.metaKey) return;
    const actions = { ArrowUp: up, ArrowDown: down, t: tie, T: tie, u: untie, U: untie };
    const action = actions[event.key];
    if (!action) return;
    event.preventDefault();
    action(i);
  }

  // A drop target: a group (join its tie) or a gap (a new group there).
  function dropZone(node, target) {
    node.addEventListener("dragover", (event) => {
      if (dragged === null) return;
      event.preventDefault();
      event.dataTransfer.dropEffect = "move";
      node.classList.add("over");
    });
    node.addEventListener("dragleave", (event) => {
      if (!node.contains(event.relatedTarget)) node.classList.remove("over");
    });
    node.addEventListener("drop", (event) => {
      event.preventDefault();
      event.stopPropagation();
      node.classList.remove("over");
      const i = dragged !== null ? dragged : parseInt(event.dataTransfer.getData("text/plain"), 10);
      dragged = null;
      if (Number.isInteger(i) && i >= 0 && i < task.k) move(i, target);
    });
  }

  function completion(i) {
    const item = rlhf.el("div", { class: "completion", draggable: "true", tabindex: "0",
                                  "data-testid": `completion-${i}`, "data-index": String(i),
                                  "aria-label": `completion ${letter(i)}` });
    item.append(rlhf.el("span", { class: "label" }, letter(i)), rlhf.el("span", { class: "text" }, task.completions[i]));
    item.addEventListener("dragstart", (event) => {
      dragged = i;
      event.dataTransfer.setData("text/plain", String(i));
      event.dataTransfer.effectAllowed = "move";
      item.classList.add("dragging");
    });
    item.addEventListener("dragend", () => {
      dragged = null;
      item.classList.remove("dragging");
      for (const node of document.querySelectorAll(".over")) node.classList.remove("over");
    });
    item.addEventListener("keydown", (event) => onKey(event, i));
    return item;
  }

  function gap(g) {
    const node = rlhf.el("div", { class: "gap", "data-testid": `gap-${g}`, "aria-hidden": "true" });
    dropZone(node, { gap: g });
    return node;
  }

  function group(g) {
    const members = groups[g];
    const node = rlhf.el("div", { class: members.length > 1 ? "group tie" : "group", "data-testid": `group-${g}`,
                                  "data-group": String(g) });
    const first = groups.slice(0, g).reduce((n, other) => n + other.length, 0) + 1;
    const place = members.length > 1 ? `${first}–${first + members.length - 1}` : String(first);
    const label = rlhf.el("div", { class: "rank" });
    label.append(rlhf.el("strong", {}, place), rlhf.el("span", {}, members.length > 1 ? "tie" : ""));
    const items = rlhf.el("div", { class: "items" });
    for (const i of members) items.append(completion(i));
    node.append(label, items);
    dropZone(node, { group: g });
    return node;
  }

  function render() {
    const box = $("groups");
    box.replaceChildren();
    for (let g = 0; g < groups.length; g++) box.append(gap(g), group(g));
    box.append(gap(groups.length));
    box.dataset.ranking = JSON.stringify(groups);  // the current ranking, for tests and curious users
  }

  function showPrompt(messages) {
    const box = $("prompt");
    box.replaceChildren();
    for (const message of messages) {
      const role = ROLES.has(message.role) ? message.role : "user";
      const node = rlhf.el("div", { class: `msg ${role}`, "data-role": role });
      node.append(rlhf.el("div", { class: "role" }, message.role), rlhf.el("div", { class: "text" }, message.content));
      box.append(node);
    }
  }

  function show(data) {
    task = data.task;
    $("task").hidden = !task;
    $("no-task").hidden = !!task;
    if (!task) {
      $("no-task").textContent = data.why || "nothing to rank";
      return;
    }
    groups = task.completions.map((_, i) => [i]);
    key = rlhf.key();
    pristine = true;
    $("all-bad").checked = false;
    $("skip-reason").value = "";
    $("task-id").textContent = task.id;
    showPrompt(task.prompt);
    render();
  }

  async function loadNext() {
    show(await rlhf.api("GET", "/api/tasks/next"));
  }

  async function send(what, body, done) {
    if (busy || !task) return;
    busy = true;
    for (const id of ["submit-ranking", "skip-task"]) $(id).disabled = true;
    try {
      await rlhf.api("POST", `/api/tasks/${encodeURIComponent(task.id)}/${what}`, { ...body, key });
      rlhf.flash("");
      $("status").textContent = done;
      await loadNext();
    } catch (err) {
      rlhf.flash(err.message);  // the same key is kept: a retry of this attempt is stored once
    } finally {
      busy = false;
      for (const id of ["submit-ranking", "skip-task"]) $(id).disabled = false;
    }
  }

  function submit() {
    const allBad = $("all-bad").checked;
    send("ranking", { ranking: allBad && pristine ? null : groups, all_bad: allBad }, "task done");
  }

  function skip() {
    const reason = $("skip-reason").value.trim();
    if (!reason) {
      rlhf.flash("say why you skip this task (skip reason)");
      $("skip-reason").focus();
      return;
    }
    send("skip", { reason }, "task skipped");
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("submit-ranking").addEventListener("click", submit);
    $("skip-task").addEventListener("click", skip);
    $("skip-reason").addEventListener("keydown", (event) => { if (event.key === "Enter") skip(); });
    loadNext().catch((err) => rlhf.flash(err.message));
  });
})();
