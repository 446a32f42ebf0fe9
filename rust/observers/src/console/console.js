// The fraiseql console: reads /api/*, shows it, and sends retries and purges with the admin
// token. Every value from the API is set as text, never as HTML.
"use strict";

const POLL_MS = 2000;
const state = {
  token: sessionStorage.getItem("fraiseql-admin-token") || "",
  mutations: "disabled",
  previous: null, // {at, counts} of the last /api/observers, for rates
  selected: new Set(),
  detail: null,
  query: "",
};

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(path, options = {}) {
  const headers = { Accept: "application/json" };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  if (state.token && options.method && options.method !== "GET") headers.Authorization = "Bearer " + state.token;
  const response = await fetch("/api" + path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const message = body && body.error ? body.error : response.status + " " + response.statusText;
    throw new Error(message);
  }
  return body;
}

function say(text, bad) {
  const message = document.getElementById("message");
  message.textContent = text;
  message.className = bad ? "bad" : "";
  message.hidden = !text;
}

function rate(name, value, now) {
  const previous = state.previous;
  if (!previous || previous.counts[name] === undefined) return "";
  const seconds = (now - previous.at) / 1000;
  if (seconds <= 0) return "";
  const perSecond = Math.max(0, value - previous.counts[name]) / seconds;
  return perSecond === 0 ? "" : perSecond.toFixed(perSecond < 10 ? 1 : 0) + "/s";
}

function count(name, value, now, counts) {
  counts[name] = value;
  return el("td", { class: "num" }, String(value), el("span", { class: "rate", text: rate(name, value, now) }));
}

async function showObservers() {
  const [overview, source] = await Promise.all([api("/observers"), api("/source")]);
  const now = Date.now();
  const counts = {};
  const rows = overview.observers.map((o) => {
    const sum = (field) => o.actions.reduce((total, a) => total + a[field], 0);
    const actions = el("td", {}, ...o.actions.map((a) => el("div", { text: a.description })));
    const watches = el("td", {}, o.entity + " ", el("code", { text: o.event }));
    const condition = el("td", {}, o.condition ? el("code", { text: o.condition }) : el("span", { class: "empty", text: "always" }));
    const name = el("td", {}, el("strong", { text: o.name }),
      o.effectively_once ? el("div", { class: "badge", text: "effectively once" }) : null);
    return el("tr", { "data-observer": o.name }, name, watches, condition, actions,
      count(o.name + ".matched", o.matched, now, counts),
      count(o.name + ".succeeded", sum("succeeded"), now, counts),
      count(o.name + ".failed", sum("failed"), now, counts),
      count(o.name + ".retried", sum("retried"), now, counts));
  });
  document.getElementById("observer-rows").replaceChildren(...rows);
  const received = rate("received", overview.events_received, now);
  counts.received = overview.events_received;
  document.getElementById("received").textContent =
    overview.events_received + " events received" + (received ? " (" + received + ")" : "") +
    ", " + overview.events_in_flight + " in flight";
  state.previous = { at: now, counts };
  showSource(source);
}

function showSource(source) {
  const facts = [["status", el("span", { class: "badge " + (source.status === "ok" ? "ok" : "bad"), text: source.status })]];
  for (const [key, value] of Object.entries(source.source || {})) {
    if (value === null || typeof value === "object") continue;
    facts.push([key.replaceAll("_", " "), String(value)]);
  }
  const lag = source.lag;
  facts.push(["change-log lag", lag.changelog_rows + " rows, " + lag.changelog_seconds.toFixed(1) + " s"]);
  if (lag.slot_retained_wal_bytes || lag.slot_lag_bytes) {
    facts.push(["slot WAL", bytes(lag.slot_retained_wal_bytes) + " retained, " + bytes(lag.slot_lag_bytes) + " behind"]);
  }
  if (source.stalled) facts.push(["stalled", el("span", { class: "badge bad", text: "yes" })]);
  for (const [key, value] of Object.entries(source.source || {})) {
    if (value && typeof value === "object") facts.push([key.replaceAll("_", " "), el("code", { text: JSON.stringify(value) })]);
  }
  document.getElementById("source").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", {}, v)]));
}

function bytes(n) {
  if (n < 1024) return n + " B";
  if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KiB";
  return (n / 1024 / 1024).toFixed(1) + " MiB";
}

async function showDeadLetters() {
  const query = state.query ? "?q=" + encodeURIComponent(state.query) : "";
  const list = await api("/dlq" + query);
  document.getElementById("dlq-count").textContent = list.total ? String(list.total) : "";
  const present = new Set(list.entries.map((e) => e.id));
  for (const id of [...state.selected]) if (!present.has(id)) state.selected.delete(id);
  const rows = list.entries.map((entry) => {
    const box = el("input", { type: "checkbox", "aria-label": "select entry " + entry.id });
    box.checked = state.selected.has(entry.id);
    box.addEventListener("change", () => {
      if (box.checked) state.selected.add(entry.id); else state.selected.delete(entry.id);
      updateBulkButtons();
    });
    const retry = el("button", { type: "button", class: "mutation", text: "Retry", onclick: () => retryEntries([entry.id]) });
    return el("tr", { "data-entry": String(entry.id), class: state.detail === entry.id ? "selected" : "" },
      el("td", {}, box),
      el("td", { class: "num" }, el("a", { href: "#dlq/" + entry.id, text: String(entry.id) })),
      el("td", { text: entry.observer }),
      el("td", { text: entry.action }),
      el("td", {}, el("code", { text: entry.event_id }), el("div", { class: "rate", text: (entry.entity || entry.origin) + " " + entry.event })),
      el("td", { class: "error-text", text: entry.error }),
      el("td", { class: "num", text: String(entry.attempts) }),
      el("td", { text: when(entry.last_failed_at) }),
      el("td", {}, entry.origin === "undecodable" ? null : retry));
  });
  document.getElementById("dlq-rows").replaceChildren(...rows);
  document.getElementById("dlq-empty").hidden = list.entries.length > 0;
  document.getElementById("dlq-empty").textContent = state.query ? "No entry matches." : "The dead-letter queue is empty.";
  updateBulkButtons();
}

function when(timestamp) {
  const date = new Date(timestamp);
  return isNaN(date) ? timestamp : date.toLocaleString();
}

function updateBulkButtons() {
  const none = state.selected.size === 0;
  document.getElementById("retry-selected").disabled = none;
  document.getElementById("purge-selected").disabled = none;
}

async function showDetail(id) {
  const detail = document.getElementById("detail");
  try {
    const entry = await api("/dlq/" + id);
    state.detail = id;
    document.getElementById("detail-id").textContent = String(entry.id);
    const facts = [
      ["observer", entry.observer], ["action", entry.action], ["origin", entry.origin],
      ["attempts", String(entry.attempts)], ["first failed", when(entry.first_failed_at)],
      ["last failed", when(entry.last_failed_at)], ["event id", entry.event.id],
    ];
    document.getElementById("detail-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
    document.getElementById("detail-error").textContent = entry.error;
    const shown = entry.raw ? { event: entry.event, raw: entry.raw } : entry.event;
    document.getElementById("detail-event").textContent = JSON.stringify(shown, null, 2);
    document.getElementById("detail-retry").hidden = entry.origin === "undecodable";
    detail.hidden = false;
  } catch (e) {
    say(e.message, true);
    closeDetail();
  }
}

function closeDetail() {
  state.detail = null;
  document.getElementById("detail").hidden = true;
  if (location.hash.startsWith("#dlq/")) history.replaceState(null, "", "#dlq");
}

async function retryEntries(ids) {
  say("Retrying " + ids.length + (ids.length === 1 ? " entry…" : " entries…"));
  try {
    const results = ids.length === 1
      ? [await api("/dlq/" + ids[0] + "/retry", { method: "POST" })]
      : (await api("/dlq/retry", { method: "POST", body: { ids } })).results;
    const delivered = results.filter((r) => r.delivered).length;
    const failed = results.filter((r) => !r.delivered);
    let text = delivered + " delivered";
    if (failed.length) text += ", " + failed.length + " failed: " + failed.map((r) => "#" + r.id + " " + r.error).join("; ");
    say(text, failed.length > 0);
    for (const r of results) if (r.delivered) state.selected.delete(r.id);
    if (state.detail !== null && results.some((r) => r.delivered && r.id === state.detail)) closeDetail();
  } catch (e) {
    say(e.message, true);
  }
  await refresh();
}

async function purgeEntries(ids) {
  if (!confirm("Purge " + ids.length + (ids.length === 1 ? " entry" : " entries") + "? This cannot be undone.")) return;
  try {
    const result = ids.length === 1
      ? await api("/dlq/" + ids[0], { method: "DELETE" })
      : await api("/dlq/purge", { method: "POST", body: { ids } });
    say(result.removed + " purged");
    for (const id of ids) state.selected.delete(id);
    if (ids.includes(state.detail)) closeDetail();
  } catch (e) {
    say(e.message, true);
  }
  await refresh();
}

async function showEvents() {
  const { events } = await api("/events?limit=100");
  const rows = events.map((event) => el("tr", {},
    el("td", { text: when(event.processed_at) }),
    el("td", {}, el("code", { text: event.id }), event.backfill ? el("span", { class: "badge", text: "backfill" }) : null),
    el("td", {}, event.entity + " ", el("code", { text: event.event })),
    el("td", {}, el("code", { text: event.key === null ? "" : event.key })),
    el("td", {}, ...(event.outcomes.length
      ? event.outcomes.map((o) => el("span", { class: "outcome " + o.outcome, text: o.observer + ": " + o.outcome.replaceAll("_", " ") }))
      : [el("span", { class: "empty", text: "no observer" })])),
    el("td", { class: "num", text: event.duration_ms.toFixed(1) })));
  document.getElementById("event-rows").replaceChildren(...rows);
  document.getElementById("events-empty").hidden = events.length > 0;
}

function currentTab() {
  const hash = location.hash.replace(/^#/, "");
  const tab = hash.split("/")[0];
  return ["observers", "dlq", "events"].includes(tab) ? tab : "observers";
}

async function refresh() {
  const tab = currentTab();
  try {
    if (tab === "observers") await showObservers();
    else if (tab === "dlq") await showDeadLetters();
    else await showEvents();
    if (tab !== "dlq") {
      const list = await api("/dlq?limit=1");
      document.getElementById("dlq-count").textContent = list.total ? String(list.total) : "";
    }
  } catch (e) {
    say("Cannot reach the engine: " + e.message, true);
  }
}

function route() {
  const tab = currentTab();
  for (const section of document.querySelectorAll("section.tab")) section.hidden = section.id !== tab;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.tab === tab);
  const entry = location.hash.match(/^#dlq\/(\d+)$/);
  if (entry) showDetail(Number(entry[1])); else if (tab !== "dlq") closeDetail();
  refresh();
}

async function start() {
  try {
    const info = await api("/console");
    state.mutations = info.mutations;
  } catch (e) {
    say("Cannot reach the engine: " + e.message, true);
  }
  const readOnly = state.mutations !== "token";
  document.body.classList.toggle("read-only", readOnly);
  const mode = document.getElementById("mode");
  mode.textContent = readOnly ? "read-only" : state.token ? "admin" : "token needed to retry and purge";
  document.getElementById("token-form").hidden = readOnly;
  document.getElementById("token").value = state.token;
  document.getElementById("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = document.getElementById("token").value.trim();
    sessionStorage.setItem("fraiseql-admin-token", state.token);
    mode.textContent = state.token ? "admin" : "token needed to retry and purge";
    say("");
  });
  document.getElementById("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.query = document.getElementById("search").value;
    refresh();
  });
  document.getElementById("select-all").addEventListener("change", (event) => {
    for (const row of document.querySelectorAll("#dlq-rows tr")) {
      const id = Number(row.dataset.entry);
      if (event.target.checked) state.selected.add(id); else state.selected.delete(id);
      row.querySelector("input").checked = event.target.checked;
    }
    updateBulkButtons();
  });
  document.getElementById("retry-selected").addEventListener("click", () => retryEntries([...state.selected]));
  document.getElementById("purge-selected").addEventListener("click", () => purgeEntries([...state.selected]));
  document.getElementById("detail-retry").addEventListener("click", () => retryEntries([state.detail]));
  document.getElementById("detail-purge").addEventListener("click", () => purgeEntries([state.detail]));
  document.getElementById("detail-close").addEventListener("click", closeDetail);
  window.addEventListener("hashchange", route);
  route();
  setInterval(refresh, POLL_MS);
}

document.addEventListener("DOMContentLoaded", start);
