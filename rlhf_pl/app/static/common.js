// Shared by every page: CSRF-carrying requests, error display, small DOM helpers.
// Model and user text is always put in the page with textContent, never innerHTML.
"use strict";

const rlhf = (() => {
  const csrf = () => document.querySelector('meta[name="csrf-token"]').content;

  function flash(message, kind = "error") {
    const box = document.getElementById("flash");
    box.textContent = message;
    box.className = "flash " + kind;
    box.hidden = !message;
  }

  // fetch() with the CSRF header and JSON in and out; throws Error(<the server's one-line error>).
  async function api(method, url, body) {
    const init = { method, headers: { "X-CSRF-Token": csrf() }, credentials: "same-origin" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(url, init);
    if (response.status === 401) { window.location = "/login?next=" + encodeURIComponent(location.pathname); }
    const data = response.headers.get("content-type")?.includes("json") ? await response.json() : {};
    if (!response.ok) { throw new Error(data.error || response.statusText); }
    return data;
  }

  // POST a JSON body and call onEvent for each line of a streamed NDJSON answer; returns the last event.
  async function stream(url, body, onEvent, signal) {
    const response = await fetch(url, {
      method: "POST", credentials: "same-origin", signal,
      headers: { "X-CSRF-Token": csrf(), "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!response.ok) {
      const data = await response.json().catch(() => ({}));
      throw new Error(data.error || response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "", last = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, cut);
        buffered = buffered.slice(cut + 1);
        if (line.trim()) { last = JSON.parse(line); onEvent(last); }
      }
    }
    if (last && last.error) throw new Error(last.error);
    return last;
  }

  function el(tag, attrs = {}, text) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key === "class") node.className = value; else node.setAttribute(key, value);
    }
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const key = () => (crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random().toString(16).slice(2)).replace(/[^A-Za-z0-9_-]/g, "");

  // A plain <form data-csrf-form> (log out) is posted by fetch, so that it carries the CSRF header too.
  document.addEventListener("submit", async (event) => {
    const form = event.target.closest("form[data-csrf-form]");
    if (!form) return;
    event.preventDefault();
    const response = await fetch(form.action, { method: "POST", credentials: "same-origin",
                                                headers: { "X-CSRF-Token": csrf() } });
    window.location = response.redirected ? response.url : form.dataset.next || "/login";
  });

  return { api, stream, flash, el, key, csrf };
})();
