// The control-plane page: the API, read with the token pasted at sign-in (kept in this
// tab's session storage, sent as the Authorization header), updated live from
// GET /stream/instances. Every text from the server is set as text, never as markup.
"use strict";

const TOKEN_KEY = "cloudbrain-token";
const STATES = ["creating", "starting", "running", "terminating", "terminated", "errored"];
const main = document.getElementById("main");
let leave = () => {}; // stops what the current view started (streams, timers)

function token() { return sessionStorage.getItem(TOKEN_KEY); }

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message || "";
  box.hidden = !message;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const headers = { Authorization: `token ${token()}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (error) {
    throw new ApiError(0, `the server cannot be reached (${error.message})`);
  }
  const text = await response.text();
  let json = null;
  try { json = JSON.parse(text); } catch (_) { /* not JSON */ }
  if (!response.ok && response.status !== 410) {
    const message = json && Array.isArray(json.errors) ? json.errors.join("; ") : `${response.status} ${response.statusText}`;
    if (response.status === 401) signOut(message);
    throw new ApiError(response.status, message);
  }
  return json;
}

// Reads GET /stream/instances?<query>, calling onEvent with each event's data, and
// reconnects with the last event's id until stop() is called.
function watch(query, onEvent) {
  let stopped = false;
  let last = null;
  let controller = null;
  (async function loop() {
    while (!stopped) {
      controller = new AbortController();
      const headers = { Authorization: `token ${token()}` };
      if (last) headers["Last-Event-ID"] = last;
      try {
        const response = await fetch(`/stream/instances?${query}`, { headers, signal: controller.signal });
        if (!response.ok) throw new Error(`stream answered ${response.status}`);
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            let id = null, name = null, data = "";
            for (const line of block.split("\n")) {
              if (line.startsWith("id: ")) id = line.slice(4);
              else if (line.startsWith("event: ")) name = line.slice(7);
              else if (line.startsWith("data: ")) data += line.slice(6);
            }
            if (id) last = id;
            if (name === "instance") onEvent(JSON.parse(data));
          }
        }
      } catch (error) {
        if (stopped) return;
      }
      if (!stopped) await new Promise((r) => setTimeout(r, 1000));
    }
  })();
  return () => { stopped = true; if (controller) controller.abort(); };
}

function when(time) { return time ? new Date(time).toLocaleString() : ""; }

function stateCell(state) {
  return el("td", { class: `state state-${state}`, text: state });
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem("cloudbrain-admin");
  location.hash = "#/signin";
  route();
  showError(message || "");
}

function signInView() {
  document.getElementById("nav").hidden = true;
  const input = el("input", { id: "token", type: "password", name: "token", autocomplete: "off", required: true });
  const form = el("form", { class: "inline", id: "sign-in", onsubmit: async (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    try {
      await api("GET", "/instances?limit=1");
    } catch (error) {
      sessionStorage.removeItem(TOKEN_KEY);
      showError(error.message);
      return;
    }
    try {
      await api("GET", "/tokens");
      sessionStorage.setItem("cloudbrain-admin", "1");
    } catch (_) {
      sessionStorage.removeItem("cloudbrain-admin");
    }
    showError("");
    location.hash = "#/instances";
  } },
  el("label", { for: "token" }, "Token", input),
  el("button", { type: "submit", text: "Sign in" }));
  main.replaceChildren(
    el("h2", { text: "Sign in" }),
    el("p", { class: "muted", text: "Paste a token that `cloudbrain create-token` printed. It stays in this tab only." }),
    form);
  input.focus();
}

function instancesView() {
  const rows = new Map(); // id -> instance
  let filter = "";
  let sortKey = "created_at";
  let descending = true;
  let cursor = null;
  const body = el("tbody", { id: "instances" });
  const more = el("button", { type: "button", id: "more", text: "Load more", hidden: true, onclick: () => load() });
  const columns = [["id", "Instance"], ["state", "State"], ["provider", "Provider"], ["image", "Image", "wide"], ["ip_address", "Address"], ["created_at", "Created", "wide"]];
  const head = el("tr", {}, ...columns.map(([key, title, wide]) => el("th", { class: wide, scope: "col" },
    el("button", { type: "button", "data-sort": key, text: title, onclick: () => {
      descending = sortKey === key ? !descending : false;
      sortKey = key;
      render();
    } }))));
  const select = el("select", { id: "state-filter", onchange: () => { filter = select.value; rows.clear(); cursor = null; load(); } },
    el("option", { value: "", text: "every state" }), ...STATES.map((s) => el("option", { value: s, text: s })));

  function render() {
    const list = [...rows.values()].filter((i) => !filter || i.state === filter);
    list.sort((a, b) => {
      const x = a[sortKey] ?? "", y = b[sortKey] ?? "";
      return (x < y ? -1 : x > y ? 1 : 0) * (descending ? -1 : 1);
    });
    body.replaceChildren(...list.map((i) => el("tr", { "data-id": i.id },
      el("td", { class: "id" }, el("a", { href: `#/instances/${i.id}`, text: i.id.slice(0, 8) })),
      stateCell(i.state),
      el("td", { text: i.provider }),
      el("td", { class: "wide", text: i.image }),
      el("td", { text: i.ip_address || "" }),
      el("td", { class: "wide", text: when(i.created_at) }))));
    more.hidden = !cursor;
  }

  async function load() {
    const params = new URLSearchParams({ limit: "50" });
    if (filter) params.set("state", filter);
    if (cursor) params.set("cursor", cursor);
    try {
      const page = await api("GET", `/instances?${params}`);
      for (const i of page.instances) rows.set(i.id, i);
      cursor = page.next_cursor;
      render();
    } catch (error) { showError(error.message); }
  }

  main.replaceChildren(
    el("h2", { text: "Instances" }),
    el("form", { class: "inline", onsubmit: (e) => e.preventDefault() }, el("label", { for: "state-filter" }, "Show", select)),
    el("div", { class: "scroll" }, el("table", {}, el("thead", {}, head), body)),
    more);
  load();
  leave = watch("", (data) => { rows.set(data.instance.id, data.instance); render(); });
}

function instanceView(id) {
  const fields = el("dl", { id: "fields" });
  const timeline = el("ol", { class: "timeline", id: "timeline" });
  const remove = el("button", { type: "button", class: "danger", id: "delete", text: "Delete", onclick: async () => {
    if (!confirm(`Delete instance ${id}? Its machine will be destroyed.`)) return;
    try { show(await api("DELETE", `/instances/${id}`)); } catch (error) { showError(error.message); }
  } });
  function show(instance) {
    const entries = [["State", instance.state], ["Provider", instance.provider], ["Image", instance.image],
      ["Type", instance.instance_type], ["Address", instance.ip_address], ["Cloud id", instance.upstream_id],
      ["Error", instance.error_reason], ["Expires", when(instance.expires_at)], ["Created", when(instance.created_at)]];
    fields.replaceChildren(...entries.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { class: k === "State" ? `state state-${v}` : null, "data-field": k.toLowerCase(), text: v ?? "" })]));
    remove.hidden = instance.state === "terminated" || instance.state === "terminating";
  }
  async function events() {
    const list = await api("GET", `/instances/${id}/events`);
    timeline.replaceChildren(...list.events.map((e) => el("li", { text: `${when(e.at)}: ${e.from_state ?? "—"} → ${e.to_state}${e.reason ? ` (${e.reason})` : ""}` })));
  }
  main.replaceChildren(el("h2", {}, "Instance ", el("span", { class: "id", text: id })), fields, remove, el("h3", { text: "Timeline" }), timeline);
  api("GET", `/instances/${id}`).then(show).then(events).catch((error) => showError(error.message));
  leave = watch(`instance=${encodeURIComponent(id)}`, (data) => { show(data.instance); events().catch(() => {}); });
}

function poolsView() {
  const body = el("tbody", { id: "pools" });
  const admin = sessionStorage.getItem("cloudbrain-admin") === "1";
  async function load() {
    try {
      const list = await api("GET", "/pools");
      body.replaceChildren(...list.pools.map((p) => {
        const input = el("input", { type: "number", min: "0", max: String(p.max_size), value: String(p.min_idle), id: `scale-${p.name}`, "aria-label": `Idle machines for ${p.name}` });
        const scale = admin ? el("form", { class: "inline", onsubmit: async (e) => {
          e.preventDefault();
          try { await api("POST", `/pools/${encodeURIComponent(p.name)}/scale`, { min_idle: Number(input.value) }); showError(""); load(); }
          catch (error) { showError(error.message); }
        } }, input, el("button", { type: "submit", text: "Scale" })) : null;
        return el("tr", { "data-pool": p.name }, el("td", { text: p.name }), el("td", { text: p.provider }),
          el("td", { "data-count": "desired", text: String(p.min_idle) }), el("td", { "data-count": "idle", text: String(p.counts.idle) }),
          el("td", { "data-count": "busy", text: String(p.counts.busy) }), el("td", { "data-count": "starting", text: String(p.counts.starting) }),
          el("td", {}, scale));
      }));
    } catch (error) { showError(error.message); }
  }
  const head = el("tr", {}, ...["Pool", "Provider", "Desired idle", "Idle", "Busy", "Starting", admin ? "Scale" : ""].map((t) => el("th", { scope: "col", text: t })));
  main.replaceChildren(el("h2", { text: "Pools" }), el("div", { class: "scroll" }, el("table", {}, el("thead", {}, head), body)));
  load();
  // Counts move with instance events (at once, for the instances this token sees) and with
  // the pool worker's (every two seconds).
  let pending = null;
  const stop = watch("", () => { if (!pending) pending = setTimeout(() => { pending = null; load(); }, 200); });
  const timer = setInterval(load, 2000);
  leave = () => { stop(); clearInterval(timer); clearTimeout(pending); };
}

function providersView() {
  const body = el("tbody", { id: "providers" });
  main.replaceChildren(el("h2", { text: "Providers" }), el("div", { class: "scroll" }, el("table", {},
    el("thead", {}, el("tr", {}, ...["Name", "Type", "Longest lifetime (s)"].map((t) => el("th", { scope: "col", text: t })))), body)));
  api("GET", "/providers").then((list) => body.replaceChildren(...list.providers.map((p) =>
    el("tr", {}, el("td", { text: p.name }), el("td", { text: p.type }), el("td", { text: p.max_lifetime_secs ?? "" })))))
    .catch((error) => showError(error.message));
}

function tokensView() {
  const body = el("tbody", { id: "tokens" });
  async function load() {
    try {
      const list = await api("GET", "/tokens");
      body.replaceChildren(...list.tokens.map((t) => {
        const revoke = t.revoked_at ? null : el("button", { type: "button", class: "danger", id: `revoke-${t.id}`,
          "aria-label": `Revoke token ${t.id} (${t.description})`, text: "Revoke", onclick: async () => {
            if (!confirm(`Revoke token ${t.id} (${t.description})? Every request it makes will be refused.`)) return;
            try { await api("DELETE", `/tokens/${t.id}`); showError(""); load(); } catch (error) { showError(error.message); }
          } });
        return el("tr", { "data-token": String(t.id), class: t.revoked_at ? "revoked" : null },
          el("td", { class: "id", text: String(t.id) }), el("td", { text: t.scope }), el("td", { text: t.description }),
          el("td", { class: "wide", text: when(t.created_at) }), el("td", { class: "wide", text: when(t.last_used_at) }),
          el("td", { "data-field": "revoked", text: t.revoked_at ? `revoked ${when(t.revoked_at)}` : "active" }),
          el("td", {}, revoke));
      }));
    } catch (error) { showError(error.message); }
  }
  const head = el("tr", {}, ...[["Id"], ["Scope"], ["Description"], ["Created", "wide"], ["Last used", "wide"], ["Status"], [""]]
    .map(([t, wide]) => el("th", { scope: "col", class: wide, text: t })));
  main.replaceChildren(el("h2", { text: "Tokens" }),
    el("p", { class: "muted", text: "New tokens are made with `cloudbrain create-token`; their secrets are shown only there." }),
    el("div", { class: "scroll" }, el("table", {}, el("thead", {}, head), body)));
  load();
}

function route() {
  leave();
  leave = () => {};
  const hash = location.hash || "#/instances";
  if (!token()) {
    if (hash !== "#/signin") location.hash = "#/signin";
    signInView();
    return;
  }
  document.getElementById("nav").hidden = false;
  document.getElementById("nav-tokens").hidden = sessionStorage.getItem("cloudbrain-admin") !== "1";
  const instance = hash.match(/^#\/instances\/([0-9a-f-]{36})$/);
  if (instance) instanceView(instance[1]);
  else if (hash === "#/pools") poolsView();
  else if (hash === "#/providers") providersView();
  else if (hash === "#/tokens") tokensView();
  else instancesView();
}

document.getElementById("sign-out").addEventListener("click", () => signOut(""));
window.addEventListener("hashchange", () => { showError(""); route(); });
route();
