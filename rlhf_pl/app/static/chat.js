// The chat page (templates/chat.html): the user's conversations with the served policy, answers streamed
// token by token, regenerations (every alternative is kept), thumbs up/down with a reason, export.
// The API is described in rlhf_pl/app/chat.py. Model and user text only ever enters the page through
// textContent (rlhf.el), never innerHTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const state = {
    chatId: null,      // the open chat's id (null: none yet; the first message makes one)
    chat: null,        // GET /api/chats/{id}
    viewing: {},       // position -> alternative shown, for earlier answers (browsing only, no selection)
    controller: null,  // the AbortController of the running stream (Stop, leaving the page)
    pending: null,     // {chatId, text, key}: a send the server may not have got; a retry reuses its key
    maxChars: 4000,
  };

  const setStatus = (text) => { $("chat-status").textContent = text || ""; };

  function setBusy(busy) {
    $("chat-send").disabled = busy;
    $("chat-stop").hidden = !busy;
    for (const button of document.querySelectorAll("#chat-messages button")) button.disabled = busy;
  }

  function button(label, testid, title, attrs = {}) {
    return rlhf.el("button", { type: "button", class: "secondary", "data-testid": testid, title,
                               "aria-label": title, ...attrs }, label);
  }

  // --- rendering ------------------------------------------------------------------------------------

  function bubble(role, text, attrs = {}) {
    const node = rlhf.el("div", { class: `msg ${role}`, "data-testid": "message", "data-role": role, ...attrs });
    node.appendChild(rlhf.el("div", { class: "role" }, role));
    node.appendChild(rlhf.el("div", { class: "text", "data-testid": "message-text" }, text));
    return node;
  }

  function userBubble(turn) {
    const message = turn.alternatives[0];
    return bubble("user", message.content, { "data-position": String(turn.position),
                                             "data-message-id": String(message.id) });
  }

  // An answer: its text, the alternative switcher, regenerate (last answer only), thumbs and reason.
  function assistantBubble(turn, isLast) {
    const alternatives = turn.alternatives;
    const shown = isLast ? turn.selected : (state.viewing[turn.position] ?? turn.selected);
    const index = Math.max(0, alternatives.findIndex((a) => a.alternative === shown));
    const message = alternatives[index];
    const node = bubble("assistant", message.content, {
      "data-position": String(turn.position), "data-message-id": String(message.id),
      "data-alternative": String(message.alternative), "data-selected": String(message.selected) });

    const tools = rlhf.el("div", { class: "msg-tools row" });
    const prev = button("‹", "alt-prev", "Previous alternative");
    const next = button("›", "alt-next", "Next alternative");
    prev.disabled = index === 0;
    next.disabled = index === alternatives.length - 1;
    prev.addEventListener("click", () => showAlternative(turn, index - 1, isLast));
    next.addEventListener("click", () => showAlternative(turn, index + 1, isLast));
    tools.append(prev, rlhf.el("span", { "data-testid": "alt-label" },
                               `alternative ${index + 1}/${alternatives.length}`), next);
    if (isLast) {
      const again = button("Regenerate", "regenerate", "Generate another answer (this one is kept)",
                           { "data-position": String(turn.position) });
      again.addEventListener("click", () => regenerate(turn.position));
      tools.append(again);
    }

    const rating = message.rating;
    const up = button("▲ Good", "rate-up", "Thumbs up", { "aria-pressed": String(rating?.value === 1) });
    const down = button("▼ Bad", "rate-down", "Thumbs down", { "aria-pressed": String(rating?.value === -1) });
    const reason = rlhf.el("input", { type: "text", "data-testid": "rate-reason", "aria-label": "Reason (optional)",
                                      placeholder: "reason (optional)", maxlength: String(state.maxChars) });
    reason.value = rating?.reason || "";
    up.addEventListener("click", () => rate(message, 1, reason.value));
    down.addEventListener("click", () => rate(message, -1, reason.value));
    reason.addEventListener("change", () => { if (message.rating) rate(message, message.rating.value, reason.value); });
    reason.addEventListener("keydown", (event) => {
      if (event.key === "Enter") { event.preventDefault(); if (message.rating) rate(message, message.rating.value, reason.value); }
    });
    tools.append(up, down, reason, rlhf.el("span", { class: "muted", "data-testid": "rate-saved" },
                                           rating ? (rating.value === 1 ? "rated good" : "rated bad") : ""));
    node.appendChild(tools);
    if (!message.selected) {
      node.appendChild(rlhf.el("div", { class: "note muted", "data-testid": "alt-note" },
                               `not selected: the conversation went on from alternative ${selectedNumber(turn)}`));
    }
    return node;
  }

  const selectedNumber = (turn) => turn.alternatives.findIndex((a) => a.selected) + 1;

  // The place of a missing answer (the stream was stopped, or the answer came out empty).
  function unansweredBubble(position) {
    const node = rlhf.el("div", { class: "msg assistant unanswered", "data-testid": "unanswered",
                                  "data-position": String(position) });
    node.appendChild(rlhf.el("div", { class: "role" }, "assistant"));
    node.appendChild(rlhf.el("div", { class: "text muted" }, "No answer (it was stopped or came out empty)."));
    const answer = button("Answer", "regenerate", "Generate the answer", { "data-position": String(position) });
    answer.addEventListener("click", () => regenerate(position));
    const tools = rlhf.el("div", { class: "msg-tools row" });
    tools.appendChild(answer);
    node.appendChild(tools);
    return node;
  }

  function render() {
    const chat = state.chat;
    $("chat-title").textContent = chat ? (chat.title || "Untitled") : "New conversation";
    const exportLink = $("chat-export");
    exportLink.hidden = !chat || !chat.positions.some((turn) => turn.role === "assistant");
    if (chat) exportLink.href = `/api/chats/${chat.id}/export`;
    const box = $("chat-messages");
    box.replaceChildren();
    if (!chat) return;
    const last = chat.positions.length - 1;
    chat.positions.forEach((turn, i) => {
      box.appendChild(turn.role === "assistant" ? assistantBubble(turn, i === last) : userBubble(turn));
    });
    if (last >= 0 && chat.positions[last].role === "user" && chat.answerable !== null) {
      box.appendChild(unansweredBubble(chat.answerable));
    }
    if (chat.generating && !state.controller) setStatus("an answer is being generated (in another tab?)");
    setBusy(Boolean(state.controller));
  }

  function renderList(chats) {
    $("chat-list").replaceChildren(...chats.map((chat) => {
      const link = rlhf.el("a", { href: `/chat?c=${chat.id}`, "data-testid": "chat-link",
                                  "data-chat-id": String(chat.id) }, chat.title || "Untitled");
      if (chat.id === state.chatId) { link.className = "active"; link.setAttribute("aria-current", "page"); }
      const item = rlhf.el("li");
      item.appendChild(link);
      return item;
    }));
  }

  async function refresh() {
    try {
      if (state.chatId !== null) state.chat = await rlhf.api("GET", `/api/chats/${state.chatId}`);
      render();
      renderList((await rlhf.api("GET", "/api/chats")).chats);
    } catch (err) {
      rlhf.flash(err.message);
    }
  }

  // --- actions --------------------------------------------------------------------------------------

  // POST url and show the streamed answer in a new bubble; resolves to the last event.
  async function streamAnswer(url, body, onStart) {
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    setStatus("generating…");
    rlhf.flash("");
    const live = bubble("assistant", "", { "data-testid": "streaming" });
    live.classList.add("streaming");
    const text = live.querySelector(".text");
    $("chat-messages").appendChild(live);
    try {
      const last = await rlhf.stream(url, body, (event) => {
        if (event.start && onStart) onStart(event);
        if (typeof event.text === "string") text.appendChild(document.createTextNode(event.text));
        if (event.done) { text.textContent = event.content; live.classList.remove("streaming"); }
      }, controller.signal);
      setStatus(last?.truncated ? "the answer reached the length limit (app.max_new_tokens)" : "");
      return last;
    } catch (err) {
      live.remove();
      if (err.name === "AbortError") setStatus("stopped: that answer was not stored");
      else { setStatus(""); rlhf.flash(err.message); }
      return null;
    } finally {
      state.controller = null;
      setBusy(false);
    }
  }

  async function send() {
    const input = $("chat-input");
    const content = input.value;
    if (!content.trim() || state.controller) return;
    try {
      if (state.chatId === null) {
        const made = await rlhf.api("POST", "/api/chats", { key: rlhf.key() });
        state.chatId = made.id;
        history.replaceState(null, "", `/chat?c=${made.id}`);
      }
    } catch (err) {
      rlhf.flash(err.message);
      return;
    }
    const same = state.pending && state.pending.chatId === state.chatId && state.pending.text === content;
    if (!same) state.pending = { chatId: state.chatId, text: content, key: rlhf.key() };
    $("chat-messages").appendChild(bubble("user", content, { "data-testid": "message-sending" }));
    await streamAnswer(`/api/chats/${state.chatId}/messages`, { content, key: state.pending.key }, () => {
      input.value = "";  // the server stored the message: a new text gets a new key
      state.pending = null;
    });
    await refresh();
    input.focus();
  }

  async function regenerate(position) {
    if (state.controller) return;
    for (const node of document.querySelectorAll(`#chat-messages .assistant[data-position="${position}"]`)) node.remove();
    await streamAnswer(`/api/chats/${state.chatId}/regenerate`, { position, key: rlhf.key() });
    delete state.viewing[position];
    await refresh();
  }

  async function showAlternative(turn, index, isLast) {
    const target = turn.alternatives[index];
    if (!target) return;
    if (!isLast) {  // an earlier answer: only look (the later turns replied to the selected one)
      state.viewing[turn.position] = target.alternative;
      render();
      return;
    }
    try {
      await rlhf.api("POST", `/api/chats/${state.chatId}/select`, { position: turn.position,
                                                                    alternative: target.alternative });
    } catch (err) {
      rlhf.flash(err.message);
    }
    await refresh();
  }

  async function rate(message, value, reason) {
    try {
      const saved = await rlhf.api("POST", `/api/messages/${message.id}/rating`, { value, reason });
      message.rating = { value: saved.value, reason: saved.reason };
      render();
      setStatus("rating saved");
    } catch (err) {
      rlhf.flash(err.message);
    }
  }

  async function newChat() {
    try {
      const made = await rlhf.api("POST", "/api/chats", { key: rlhf.key() });
      window.location = `/chat?c=${made.id}`;
    } catch (err) {
      rlhf.flash(err.message);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    const pageBox = $("chat-page");
    state.maxChars = Number(pageBox.dataset.maxChars) || state.maxChars;
    state.chatId = pageBox.dataset.chatId ? Number(pageBox.dataset.chatId) : null;
    $("chat-form").addEventListener("submit", (event) => { event.preventDefault(); send(); });
    $("chat-input").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); send(); }
    });
    $("chat-stop").addEventListener("click", () => state.controller?.abort());
    $("new-chat").addEventListener("click", newChat);
    window.addEventListener("pagehide", () => state.controller?.abort());  // leaving cancels the generation
    if (state.chatId !== null) refresh(); else render();
    $("chat-input").focus();
  });
})();
