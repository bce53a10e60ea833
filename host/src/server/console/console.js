// Tessera console: one page over the server's own API. Everything shown
// comes from the API with the key the user typed (kept in this tab's
// sessionStorage, sent only as a Bearer header). Text from the server is
// always inserted as text; the only HTML taken from the server is a report
// the server rendered from Markdown with raw HTML escaped.
"use strict";

const MAX_PICKS = 4;
const state = { key: sessionStorage.getItem("tessera-key") || "", models: [], picked: [], report: null };

// ---- small DOM helpers -------------------------------------------------
function el(tag, attrs, ...children) {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") n.className = v;
    else if (k.startsWith("on")) n.addEventListener(k.slice(2), v);
    else n.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    n.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return n;
}
const $ = (sel) => document.querySelector(sel);
function clear(n) { while (n.firstChild) n.removeChild(n.firstChild); return n; }
function fmtParams(p) {
  if (!p) return "";
  if (p >= 1e9) return (p / 1e9).toFixed(1) + "B";
  if (p >= 1e6) return Math.round(p / 1e6) + "M";
  return String(p);
}
function fmtMs(ms) { return ms >= 1000 ? (ms / 1000).toFixed(2) + " s" : Math.round(ms) + " ms"; }

// ---- the API -----------------------------------------------------------
function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}
class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}
async function errorOf(resp) {
  let message = resp.status + " " + resp.statusText;
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON */ }
  return new ApiError(resp.status, message);
}
async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const resp = await fetch(path, opts);
  if (!resp.ok) throw await errorOf(resp);
  return resp;
}
async function apiJson(path, options) { return (await api(path, options)).json(); }

// ---- notices -----------------------------------------------------------
// An error stays until the next success clears it; news ("Published x")
// stays for a while, and is not cleared by the refresh that follows it.
let noticeTimer = null;
function notice(message, kind) {
  const n = $("#notice");
  clearTimeout(noticeTimer);
  if (!message) { n.hidden = true; return; }
  n.hidden = false;
  n.className = "notice" + (kind === "info" ? " info" : "");
  n.textContent = message;
  if (kind === "info") noticeTimer = setTimeout(() => { n.hidden = true; }, 10_000);
}
function clearError() {
  if (!$("#notice").classList.contains("info")) notice(null);
}
function explain(err) {
  if (err instanceof ApiError && err.status === 401) {
    const m = err.message.replace(/[.\s]*$/, "");
    return "The server refused the key: " + m + ". Type a valid key at the top right and press Use key.";
  }
  if (err instanceof ApiError && err.status === 403) return "Not allowed with this key: " + err.message;
  return err.message || String(err);
}

// ---- views -------------------------------------------------------------
function show(view) {
  for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.dataset.view === view);
  for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== "view-" + view;
  if (view === "pool") renderPool();
  if (view === "modules") loadModules();
  if (view === "reports") loadReports();
  history.replaceState(null, "", "#" + view);
}

async function loadModels() {
  try {
    const body = await apiJson("/v1/models");
    state.models = body.data || [];
    clearError();
  } catch (err) {
    state.models = [];
    notice(explain(err));
  }
  state.picked = state.picked.filter((id) => state.models.some((m) => m.id === id));
  renderPickers();
  renderPool();
}

function renderPickers() {
  const groups = { system: $("#pick-systems .chips"), member: $("#pick-members .chips") };
  clear(groups.system); clear(groups.member);
  for (const m of state.models) {
    const t = m.tessera || {};
    const generative = t.kind === "system" || (t.status === "ready" && (t.capabilities || []).includes("generate"));
    if (!generative) continue;
    const on = state.picked.includes(m.id);
    const full = !on && state.picked.length >= MAX_PICKS;
    const box = el("input", { type: "checkbox", checked: on, disabled: full, "data-id": m.id });
    box.addEventListener("change", () => {
      if (box.checked) state.picked.push(m.id); else state.picked = state.picked.filter((x) => x !== m.id);
      renderPickers();
    });
    const chip = el("label", { class: "chip" + (on ? " on" : "") + (full ? " off" : ""), title: t.description || "" }, box, m.id);
    (groups[t.kind] || groups.member).append(chip);
  }
  if (!groups.system.firstChild) groups.system.append(el("span", { class: "muted" }, "none"));
  if (!groups.member.firstChild) groups.member.append(el("span", { class: "muted" }, "none"));
  const n = state.picked.length;
  $("#pick-count").textContent = n === 0 ? "none picked" : n + " of " + MAX_PICKS + " picked";
  $("#ask").disabled = n === 0;
}

// ---- compare: streamed answers and their provenance ----------------------
async function ask(ev) {
  ev.preventDefault();
  const question = $("#question").value.trim();
  if (!question) { notice("Type a question first.", "info"); return; }
  notice(null);
  const answers = clear($("#answers"));
  const maxTokens = parseInt($("#max-tokens").value, 10) || 48;
  const temperature = parseFloat($("#temperature").value) || 0;
  await Promise.all(state.picked.map((id) => {
    const model = state.models.find((m) => m.id === id);
    const card = answerCard(id, (model && model.tessera && model.tessera.kind) || "member");
    answers.append(card.root);
    return streamAnswer(id, question, maxTokens, temperature, card);
  }));
}

function answerCard(id, kind) {
  const stateEl = el("span", { class: "state" }, "waiting");
  const text = el("div", { class: "text streaming" });
  const prov = el("div", { class: "prov", hidden: true });
  const root = el("div", { class: "card", "data-model": id },
    el("div", { class: "card-head" }, el("span", { class: "name" }, id), el("span", { class: "badge " + kind }, kind), stateEl),
    text, prov);
  return { root, kind, stateEl, text, prov, started: performance.now() };
}

async function streamAnswer(model, question, maxTokens, temperature, card) {
  const body = JSON.stringify({
    model, stream: true, max_tokens: maxTokens, temperature,
    messages: [{ role: "user", content: question }],
  });
  let resp;
  try {
    resp = await api("/v1/chat/completions", { method: "POST", headers: { "Content-Type": "application/json" }, body });
  } catch (err) {
    return failCard(card, explain(err));
  }
  card.stateEl.textContent = "answering…";
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  let provenance = null;
  let note = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const raw = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = raw.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data || data === "[DONE]") continue;
      let chunk;
      try { chunk = JSON.parse(data); } catch (_) { continue; }
      if (chunk.error) return failCard(card, chunk.error.message || "the request failed");
      if (chunk.tessera && chunk.tessera.streaming === "final-answer") note = chunk.tessera.note;
      const choice = (chunk.choices || [])[0];
      const piece = choice && choice.delta && choice.delta.content;
      if (piece) {
        if (!card.firstToken) card.firstToken = performance.now();
        card.root.dataset.chunks = String(Number(card.root.dataset.chunks || 0) + 1);
        card.text.textContent += piece;
      }
      if (chunk.provenance) provenance = chunk.provenance;
    }
  }
  card.text.classList.remove("streaming");
  const took = performance.now() - card.started;
  card.stateEl.textContent = "done in " + fmtMs(took);
  card.stateEl.classList.add("done");
  renderProvenance(card, provenance, note, took);
}

function failCard(card, message) {
  card.text.classList.remove("streaming");
  card.text.classList.add("error-text");
  card.text.textContent = message;
  card.stateEl.textContent = "failed";
  card.stateEl.classList.add("error");
}

function renderProvenance(card, prov, note, tookMs) {
  if (!prov) return;
  const p = clear(card.prov);
  p.hidden = false;
  const events = prov.events || [];
  const calls = events.filter((e) => e.source === "host-call");
  const steps = events.filter((e) => e.source === "module-step");
  const usage = prov.usage || {};
  const tokens = calls.reduce((a, c) => a + (c.prompt_tokens || 0) + (c.completion_tokens || 0), 0);
  p.append(el("div", { class: "summary" },
    calls.length + " host call" + (calls.length === 1 ? "" : "s") + " · " + tokens + " tokens" +
    (usage.cached_tokens ? " (" + usage.cached_tokens + " from the prefix cache)" : "") + " · " + fmtMs(tookMs) + " end to end"));
  const members = prov.members || [];
  if (members.length) {
    p.append(el("h3", {}, "Members consulted"),
      el("div", { class: "contributors" }, members.map((m) => el("span", { class: "badge" }, m))));
  }
  // Whose words reached the answer: measured by the host from what each
  // member generated (shared runs of three words), not claimed by the module.
  const shaped = prov.attribution || [];
  const generated = calls.some((c) => c.call.startsWith("generate") && c.outcome === "ok");
  if (card.kind === "system" && generated) {
    p.append(el("h3", {}, "Whose words reached the answer"));
    if (!shaped.length) {
      p.append(el("p", { class: "muted attribution-none" },
        "No member's wording appears in the answer: the system chose or rewrote it."));
    } else {
      p.append(el("div", { class: "attribution" }, shaped.map((a) => {
        const pct = Math.round(100 * a.share);
        const bar = el("div", { class: "share-bar" });
        bar.style.width = pct + "%";
        return el("div", { class: "share-row", "data-member": a.member, title: a.words + " of the answer's words are in text this member generated" },
          el("span", { class: "share-label" }, a.member, a.contributor ? el("span", { class: "muted" }, " · " + a.contributor) : null),
          el("div", { class: "share-track" }, bar),
          el("span", { class: "share-pct" }, pct + "%"));
      })));
    }
  }
  if (calls.length) {
    p.append(el("h3", {}, "Host calls"));
    const end = Math.max(1, ...calls.map((c) => (c.start_ms || 0) + (c.ms || 0)));
    const tl = el("div", { class: "timeline" });
    for (const c of calls) {
      const left = 100 * (c.start_ms || 0) / end;
      const width = Math.max(0.8, 100 * (c.ms || 0) / end);
      const label = c.call + " · " + c.model;
      const detail = label + ": " + (c.prompt_tokens || 0) + " prompt + " + (c.completion_tokens || 0) +
        " completion tokens" + (c.cached_tokens ? ", " + c.cached_tokens + " cached" : "") + ", " + fmtMs(c.ms || 0) +
        (c.outcome && c.outcome !== "ok" ? " (" + c.outcome + ")" : "");
      const bar = el("div", { class: "tl-bar" + (c.outcome && c.outcome !== "ok" ? " failed" : "") });
      // Set through the CSSOM: the page's policy refuses style attributes.
      bar.style.left = left.toFixed(2) + "%";
      bar.style.width = Math.min(width, 100 - left).toFixed(2) + "%";
      tl.append(el("div", { class: "tl-row", title: detail },
        el("span", { class: "tl-label" }, label),
        el("div", { class: "tl-track" }, bar)));
    }
    tl.append(el("div", { class: "tl-axis" }, el("span", {}, "0"), el("span", {}, fmtMs(end))));
    p.append(tl);
  }
  if (steps.length) {
    p.append(el("h3", {}, "Module steps"),
      el("ol", { class: "steps" }, steps.map((s) => el("li", {}, (s.model ? s.model + " · " : "") + s.role + ": " + s.note))));
  }
  const ann = prov.annotations || {};
  const keys = Object.keys(ann);
  if (keys.length) {
    p.append(el("h3", {}, "Annotations"),
      el("div", { class: "kv" }, keys.map((k) => el("div", {}, el("code", {}, k), " = " + String(ann[k])))));
  }
  if (note) p.append(el("div", { class: "kv" }, note));
}

// ---- pool ----------------------------------------------------------------
function renderPool() {
  const root = clear($("#pool"));
  const members = state.models.filter((m) => (m.tessera || {}).kind === "member");
  if (!members.length) { root.append(el("p", { class: "muted" }, "No members (or the key was refused).")); return; }
  root.append(el("table", {},
    el("thead", {}, el("tr", {}, ["Member", "Contributor", "Architecture", "Parameters", "License", "Capabilities", "Status"].map((h) => el("th", {}, h)))),
    el("tbody", {}, members.map((m) => {
      const t = m.tessera || {};
      return el("tr", { "data-member": m.id },
        el("td", {}, el("strong", {}, m.id), t.description ? el("div", { class: "muted" }, t.description) : null),
        el("td", {}, m.owned_by || ""),
        el("td", {}, t.architecture || ""),
        el("td", { class: "num" }, fmtParams(t.parameters)),
        el("td", {}, t.license || ""),
        el("td", {}, (t.capabilities || []).join(", ")),
        el("td", {}, el("span", { class: "badge " + (t.status || "") }, t.status || "?"), t.reason ? el("div", { class: "muted" }, t.reason) : null));
    }))));
}

// ---- modules ---------------------------------------------------------------
async function loadModules() {
  const pub = clear($("#modules-published"));
  try {
    const body = await apiJson("/v1/tessera/modules");
    const rows = body.data || [];
    if (!rows.length) pub.append(el("p", { class: "muted" }, "Nothing published yet."));
    else pub.append(el("table", {},
      el("thead", {}, el("tr", {}, ["Module", "World", "Version", "Author", "Signature", "Budgets", "Quarantine", "Size", "Published", ""].map((h) => el("th", {}, h)))),
      el("tbody", {}, rows.map((e) => el("tr", { "data-module": e.name },
        el("td", {}, el("strong", {}, e.name), el("div", { class: "muted" }, e.description || ""), el("div", { class: "mono muted" }, (e.sha256 || "").slice(0, 16))),
        el("td", {}, e.world), el("td", {}, e.version), el("td", {}, e.author),
        el("td", {}, e.publisher_key ? el("span", { class: "badge ready", title: e.publisher_key }, "signed") : el("span", { class: "badge" }, "unsigned")),
        el("td", { class: "budgets" }, budgetsOf(e.budgets)),
        el("td", { class: "quarantine" }, quarantineOf(e.quarantine)),
        el("td", { class: "num" }, Math.round((e.size || 0) / 1024) + " KiB"),
        el("td", {}, new Date((e.published_at || 0) * 1000).toLocaleString()),
        el("td", {}, el("button", { class: "danger", onclick: () => removeModule(e.name) }, "Remove")))))));
  } catch (err) {
    pub.append(el("p", { class: "error-text" }, explain(err)));
  }
  const std = clear($("#modules-standard"));
  const systems = state.models.filter((m) => (m.tessera || {}).kind === "system");
  std.append(el("table", {},
    el("thead", {}, el("tr", {}, ["System", "Source", "Author", "What it does", "Budgets", "Quarantine"].map((h) => el("th", {}, h)))),
    el("tbody", {}, systems.map((m) => el("tr", { "data-system": m.id },
      el("td", {}, el("strong", {}, m.id), (m.tessera || {}).version ? el("div", { class: "muted" }, (m.tessera || {}).version) : null),
      el("td", {}, (m.tessera || {}).source || ""),
      el("td", {}, m.owned_by || ""), el("td", {}, (m.tessera || {}).description || ""),
      el("td", { class: "budgets" }, budgetsOf((m.tessera || {}).budgets)),
      el("td", { class: "quarantine" }, quarantineOf((m.tessera || {}).quarantine)))))));
}

// What the sandbox grants a module per request (its manifest's ask, capped
// by the operator's policy), in the units an operator thinks in.
function budgetsOf(b) {
  if (!b) return el("span", { class: "muted" }, "?");
  const count = (n) => n >= 1e9 ? +(n / 1e9).toFixed(1) + "G" : n >= 1e6 ? +(n / 1e6).toFixed(1) + "M" : n >= 1e4 ? Math.round(n / 1e3) + "k" : String(n);
  const time = (ms) => ms >= 120_000 ? +(ms / 60_000).toFixed(1) + " min" : fmtMs(ms);
  return el("div", { class: "budget-list" },
    el("span", { title: "wall-clock deadline per request" }, time(b.deadline_ms)),
    el("span", { title: "linear memory" }, b.memory_mib + " MiB"),
    el("span", { title: "WebAssembly fuel" }, count(b.fuel) + " fuel"),
    el("span", { title: "model calls" }, count(b.host_calls) + " calls"),
    el("span", { title: "generated tokens" }, count(b.tokens) + " tokens"),
    el("span", { title: "members it may call" }, b.members + " members"));
}

// Quarantine is per key: whether this key may run it now, and, for admins,
// how many keys have it quarantined.
function quarantineOf(q) {
  if (!q) return "";
  const mine = q.for_this_key_s
    ? el("span", { class: "badge unavailable", title: "it kept failing on this key's requests" }, "quarantined " + q.for_this_key_s + " s")
    : el("span", { class: "badge ready" }, "runs");
  const others = typeof q.keys === "number" && q.keys > 0
    ? el("div", { class: "muted" }, q.keys + " key" + (q.keys === 1 ? "" : "s") + " quarantined") : null;
  return el("div", {}, mine, others);
}

async function removeModule(name) {
  if (!confirm("Remove the module `" + name + "` from the registry?")) return;
  try {
    await api("/v1/tessera/modules/" + encodeURIComponent(name), { method: "DELETE" });
    notice("Removed " + name + ".", "info");
  } catch (err) { notice(explain(err)); }
  await loadModels();
  loadModules();
}

function base64Of(buffer) {
  const bytes = new Uint8Array(buffer);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

async function publish(ev) {
  ev.preventDefault();
  const wasm = $("#pub-wasm").files[0];
  const manifest = $("#pub-manifest").files[0];
  if (!wasm || !manifest) { notice("Pick the component (.wasm) and its manifest (.toml).", "info"); return; }
  const body = { wasm_base64: base64Of(await wasm.arrayBuffer()), manifest: await manifest.text() };
  const sig = $("#pub-sig").value.trim();
  if (sig) body.signature = sig;
  try {
    const e = await apiJson("/v1/tessera/modules", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    notice("Published " + e.name + " " + e.version + ".", "info");
  } catch (err) { notice(explain(err)); }
  await loadModels();
  loadModules();
}

// ---- reports ---------------------------------------------------------------
async function loadReports() {
  const list = clear($("#report-list"));
  try {
    const body = await apiJson("/v1/tessera/reports");
    for (const r of body.data || []) {
      const a = el("a", { href: "#reports", "data-report": r.name, onclick: (e) => { e.preventDefault(); openReport(r.name); } },
        r.title, el("span", { class: "path" }, r.name));
      list.append(el("li", {}, a));
    }
    if (!list.firstChild) list.append(el("li", { class: "muted" }, "No reports in the directory."));
    if (state.report) markActive(state.report);
  } catch (err) {
    list.append(el("li", { class: "muted" }, explain(err)));
  }
}

function markActive(name) {
  for (const a of document.querySelectorAll("#report-list a")) a.classList.toggle("active", a.dataset.report === name);
}

async function openReport(name) {
  state.report = name;
  markActive(name);
  const art = clear($("#report"));
  art.append(el("p", { class: "muted" }, "Loading " + name + "…"));
  let r;
  try { r = await apiJson("/v1/tessera/reports/" + name.split("/").map(encodeURIComponent).join("/")); }
  catch (err) { clear(art).append(el("p", { class: "error-text" }, explain(err))); return; }
  clear(art);
  // The server rendered these from Markdown with any raw HTML escaped.
  if (r.summary_html) art.append(htmlBlock(r.summary_html));
  const plotsShown = new Set([...art.querySelectorAll("img[data-plot]")].map((i) => i.dataset.plot));
  const extra = (r.plots || []).filter((p) => !plotsShown.has(p));
  if (extra.length) {
    art.append(el("h2", {}, "Plots"), el("div", { class: "plots" }, extra.map((p) => el("img", { class: "plot", "data-plot": p, alt: p }))));
  }
  const full = el("details", { open: !r.summary_html }, el("summary", {}, "The full report"), htmlBlock(r.report_html));
  art.append(full);
  for (const img of art.querySelectorAll("img[data-plot]")) loadPlot(name, img);
}

function htmlBlock(html) {
  const div = document.createElement("div");
  div.innerHTML = html;
  for (const a of div.querySelectorAll("a[href]")) {
    if (!/^https?:/i.test(a.getAttribute("href"))) { a.removeAttribute("href"); a.classList.add("muted"); }
    else { a.target = "_blank"; a.rel = "noopener noreferrer"; }
  }
  return div;
}

async function loadPlot(report, img) {
  try {
    const resp = await api("/v1/tessera/reports/" + report.split("/").map(encodeURIComponent).join("/") + "/" + encodeURIComponent(img.dataset.plot));
    img.src = URL.createObjectURL(await resp.blob());
  } catch (err) {
    img.replaceWith(el("p", { class: "muted" }, "(plot " + img.dataset.plot + " is missing: " + explain(err) + ")"));
  }
}

// ---- start -------------------------------------------------------------------
function start() {
  for (const t of document.querySelectorAll(".tab")) t.addEventListener("click", () => show(t.dataset.view));
  $("#key").value = state.key;
  $("#key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.key = $("#key").value.trim();
    if (state.key) sessionStorage.setItem("tessera-key", state.key); else sessionStorage.removeItem("tessera-key");
    loadModels().then(() => { const v = (location.hash || "#compare").slice(1); if (v !== "compare") show(v); });
  });
  $("#key-forget").addEventListener("click", () => {
    state.key = ""; $("#key").value = ""; sessionStorage.removeItem("tessera-key"); loadModels();
  });
  $("#ask-form").addEventListener("submit", ask);
  $("#publish-form").addEventListener("submit", publish);
  const view = (location.hash || "#compare").slice(1);
  loadModels().then(() => show(["compare", "pool", "modules", "reports"].includes(view) ? view : "compare"));
}
document.addEventListener("DOMContentLoaded", start);
