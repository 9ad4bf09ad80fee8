// The admin page: accounts, queues and their overlap, agreement between labelers, exports.
// Every text from the server goes into the page with textContent (rlhf.el), never innerHTML.
"use strict";

(() => {
  const { api, flash, el, key } = rlhf;
  const fmt = (x, digits = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
  const pct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(0) + " %");

  function fill(tbody, rows) {
    tbody.replaceChildren(...rows);
  }

  function cells(row, values) {
    for (const value of values) row.appendChild(value instanceof Node ? wrap(value) : el("td", {}, String(value)));
    return row;
  }

  function wrap(node) {
    const td = el("td");
    td.appendChild(node);
    return td;
  }

  // --- users ----------------------------------------------------------------------------------------

  async function changeUser(id, change, done) {
    try {
      await api("PATCH", `/api/admin/users/${id}`, change);
      flash(done, "ok");
    } catch (err) {
      flash(err.message);
    }
    await loadUsers();
  }

  function userControls(user) {
    const box = el("div", { class: "row" });
    const role = el("select", { class: "user-role", "aria-label": "role of " + user.username });
    for (const name of ["admin", "labeler"]) {
      const option = el("option", { value: name }, name);
      if (name === user.role) option.selected = true;
      role.appendChild(option);
    }
    role.addEventListener("change", () => changeUser(user.id, { role: role.value }, `${user.username} is now ${role.value}`));
    const active = el("button", { type: "button", class: "secondary user-active" }, user.active ? "Deactivate" : "Activate");
    active.addEventListener("click", () => changeUser(user.id, { active: !user.active },
      `${user.username} ${user.active ? "deactivated" : "activated"}`));
    const password = el("input", { type: "password", class: "user-password", placeholder: "new password",
      minlength: "8", maxlength: "256", "aria-label": "new password of " + user.username });
    const set = el("button", { type: "button", class: "secondary user-password-set" }, "Set password");
    set.addEventListener("click", () => {
      if (password.value) changeUser(user.id, { password: password.value }, `new password set for ${user.username}`);
    });
    box.append(role, active, password, set);
    return box;
  }

  async function loadUsers() {
    const { users } = await api("GET", "/api/admin/users");
    fill(document.querySelector("#users-table tbody"), users.map((user) => {
      const row = el("tr", { "data-username": user.username, class: user.active ? "" : "inactive" });
      return cells(row, [user.username, user.role, user.active ? "yes" : "no", (user.created_at || "").slice(0, 16),
        userControls(user)]);
    }));
  }

  function setUpCreateForm() {
    const form = document.getElementById("create-user-form");
    let attempt = key();  // one key per filled-in form: a double click creates the account once
    form.addEventListener("input", () => { attempt = key(); });
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const button = document.getElementById("create-user");
      button.disabled = true;
      try {
        const body = { username: document.getElementById("new-username").value,
          password: document.getElementById("new-password").value,
          role: document.getElementById("new-role").value, key: attempt };
        const { user } = await api("POST", "/api/admin/users", body);
        flash(`account ${user.username} (${user.role}) created`, "ok");
        form.reset();
        attempt = key();
        await loadUsers();
      } catch (err) {
        flash(err.message);
      } finally {
        button.disabled = false;
      }
    });
  }

  // --- queues ---------------------------------------------------------------------------------------

  function overlapControl(queue) {
    const box = el("div", { class: "row" });
    const input = el("input", { type: "number", min: "1", max: "50", value: String(queue.overlap_max),
      class: "overlap-input", "aria-label": "overlap of " + queue.queue });
    const set = el("button", { type: "button", class: "secondary overlap-set" }, "Set");
    set.addEventListener("click", async () => {
      try {
        const answer = await api("PATCH", `/api/admin/queues/${encodeURIComponent(queue.queue)}`,
          { overlap: Number(input.value) });
        const kept = answer.kept_higher.length ? `; ${answer.kept_higher.length} tasks kept a higher overlap` : "";
        flash(`${answer.queue}: overlap ${answer.overlap} (${answer.changed} tasks changed${kept})`, "ok");
      } catch (err) {
        flash(err.message);
      }
      await loadQueues();
    });
    box.append(input, set);
    return box;
  }

  async function loadQueues() {
    const [progress, stats] = await Promise.all([api("GET", "/api/admin/queues"), api("GET", "/api/admin/stats")]);
    fill(document.querySelector("#queues-table tbody"), progress.queues.map((q) => {
      const overlap = q.overlap_min === q.overlap_max ? "" : ` (now ${q.overlap_min}–${q.overlap_max})`;
      const control = overlapControl(q);
      if (overlap) control.appendChild(el("span", { class: "muted" }, overlap));
      return cells(el("tr", { "data-queue": q.queue }), [q.queue, q.tasks, q.wanted, q.done, q.skipped, q.open,
        q.complete, pct(q.progress), control]);
    }));
    fill(document.querySelector("#labelers-table tbody"), progress.labelers.map((p) =>
      cells(el("tr", { "data-labeler": p.username, class: p.active ? "" : "inactive" }),
        [p.username, p.assigned, p.open, p.done, p.skipped])));
    fill(document.querySelector("#stats-table tbody"), flatten(stats).map(([name, value]) =>
      cells(el("tr", { "data-stat": name }), [name, value])));
  }

  // {"users": {"admin": 1}, "worker": null} -> [["users admin", 1], ["worker", "–"]]
  function flatten(value, prefix = "") {
    if (value === null || value === undefined) return [[prefix, "–"]];
    if (typeof value !== "object") return [[prefix, value]];
    const rows = Object.entries(value).flatMap(([name, inner]) => flatten(inner, prefix ? `${prefix} ${name}` : name));
    return rows.length ? rows : [[prefix, 0]];
  }

  // --- agreement ------------------------------------------------------------------------------------

  async function loadAgreement() {
    const report = await api("GET", "/api/admin/agreement");
    const o = report.overall;
    document.getElementById("agreement-overall").textContent =
      `Overall: ${o.tasks} shared tasks, ${o.pairs} labeler pairs, agreement ${fmt(o.agreement)}, τ ${fmt(o.tau)}`;
    fill(document.querySelector("#agreement-table tbody"), report.labelers.map((l) =>
      cells(el("tr", { "data-labeler": l.username, class: l.flagged ? "flagged" : "" }),
        [l.username, l.tasks, l.pairs, fmt(l.agreement), fmt(l.tau), fmt(l.others), l.flagged ? "unreliable?" : ""])));
  }

  // --- exports --------------------------------------------------------------------------------------

  const EXPORT_NAMES = { demonstrations: "Demonstrations", rankings_per_labeler: "Rankings, per labeler",
    rankings_merged: "Rankings, merged", chats: "Chats", pairwise: "Pairwise" };

  async function loadExports() {
    const summary = await api("GET", "/api/admin/export/summary");
    fill(document.querySelector("#export-summary tbody"), Object.entries(EXPORT_NAMES).map(([name, label]) => {
      const s = summary[name];
      const left = Object.entries(s.left_out).map(([why, n]) => `${why.replaceAll("_", " ")}: ${n}`).join(", ");
      return cells(el("tr", { "data-export": name }), [label, s.records, left || "none"]);
    }));
  }

  // --- tabs -----------------------------------------------------------------------------------------

  const LOADERS = { users: loadUsers, queues: loadQueues, agreement: loadAgreement, export: loadExports };

  async function show(tab) {
    for (const button of document.querySelectorAll("#admin-tabs [data-tab]")) {
      button.setAttribute("aria-selected", String(button.dataset.tab === tab));
    }
    for (const section of document.querySelectorAll("[data-section]")) section.hidden = section.dataset.section !== tab;
    flash("");
    try {
      await LOADERS[tab]();
    } catch (err) {
      flash(err.message);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    for (const button of document.querySelectorAll("#admin-tabs [data-tab]")) {
      button.addEventListener("click", () => show(button.dataset.tab));
    }
    setUpCreateForm();
    show(location.hash.slice(1) in LOADERS ? location.hash.slice(1) : "users");
  });
})();
