// The web page, the admin's console, served at / by the daemon: one static
// HTML document with inline script and style (no framework, no CDN, works
// offline). It asks for an API token (kept in the browser's localStorage)
// and a repository (chosen from the configured names, or a location typed
// in when the daemon allows any), then shows:
// - the domains of every connection the daemon reaches (qbackup's own and
//   libvirt's, the connection shown) with state, disks and last backup, and
//   a "Back up now" button whose progress bar follows the task's events;
// - each own domain's checkpoint chain with per-disk coverage;
// - the backups with their sizes and the repository's dedup, damaged
//   manifests marked damaged (by name) among the readable ones, Verify, and
//   a restore dialog for every kind (to a directory, into a shut-off domain,
//   instant, define a new domain), and the file browser;
// - the tasks, each with its log;
// - the schedules, added, changed, paused, resumed, run now and removed.
// Invariants: every name or text from the daemon (domain and guest names,
// messages) reaches the document escaped (esc() or textContent); a
// read-only token sees no button that would change anything (class
// "write", hidden under body.readonly); tables are redrawn only when their
// content changed, so a refresh never swaps a button under the pointer.

import { FILE_BROWSER_HTML, FILE_BROWSER_SCRIPT } from './page-files.js';

export const PAGE_HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>qbackup</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
  h1 { font-size: 1.4em; margin: 0 0 .5em; }
  h2 { font-size: 1.1em; margin: 1.5em 0 .5em; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: .3em .6em; border-bottom: 1px solid #ddd; vertical-align: top; }
  th { background: #f4f4f4; }
  input, select { font: inherit; padding: .2em .4em; }
  button { font: inherit; padding: .2em .8em; cursor: pointer; }
  progress { width: 12em; vertical-align: middle; }
  .state-running { color: #070; } .state-failed { color: #b00; } .state-succeeded { color: #070; }
  .muted { color: #777; } .err { color: #b00; }
  #settings label { margin-right: 1em; }
  .chain { display: flex; flex-wrap: wrap; align-items: flex-start; gap: .3em; margin: .3em 0; }
  .ckpt { border: 1px solid #bbb; border-radius: 4px; padding: .2em .5em; font-size: .9em; }
  .ckpt.current { border-color: #06c; }
  .arrow { color: #999; align-self: center; }
  .inc { color: #070; } .full { color: #b60; }
  .conn { font-family: ui-monospace, monospace; font-size: .9em; color: #555; }
  tr.damaged td { background: #fff0f0; }
  .badge { display: inline-block; padding: 0 .4em; border-radius: 3px; font-size: .85em; }
  .badge.damaged { background: #b00; color: #fff; }
  .badge.paused { background: #999; color: #fff; }
  dialog { border: 1px solid #888; border-radius: 6px; padding: 1em 1.2em; max-width: 44em; }
  dialog label { display: block; margin: .4em 0; }
  dialog .row { margin: .6em 0; }
  dialog menu { display: flex; gap: .5em; justify-content: flex-end; padding: 0; margin: 1em 0 0; }
  #task-log-lines { max-height: 24em; overflow: auto; background: #f8f8f8; padding: .5em; white-space: pre-wrap; font: 12px/1.4 ui-monospace, monospace; }
  .readonly .write, [hidden] { display: none !important; }
</style>
</head>
<body>
<h1>qbackup</h1>
<div id="settings">
  <label>API token <input id="token" type="password" size="40" autocomplete="off"></label>
  <label>Repository <select id="repo-choice"></select></label>
  <input id="repo" size="30" placeholder="/backups" aria-label="Repository location">
  <button id="save">Use</button>
  <span id="who" class="muted"></span>
</div>
<p id="error" class="err" role="alert"></p>
<h2>Domains</h2>
<table id="domains"><thead><tr><th>Name</th><th>State</th><th>Connection</th><th>Disks</th><th>Last backup</th><th></th><th>Progress</th></tr></thead><tbody></tbody></table>
<p id="connection-errors" class="err"></p>
<h2>Checkpoint chains</h2>
<p class="muted">Per disk of qbackup's own domains: can a backup since the checkpoint be incremental, and if not, why (the newest 8 checkpoints of each domain).</p>
<div id="chains"></div>
<h2>Backups <button id="verify" class="write">Verify repository</button></h2>
<p id="stats" class="muted"></p>
<table id="backups"><thead><tr><th>Backup</th><th>Domain</th><th>Time</th><th>Disks</th><th>Read</th><th>Stored</th><th></th></tr></thead><tbody></tbody></table>
${FILE_BROWSER_HTML}<h2>Tasks</h2>
<table id="tasks"><thead><tr><th>Task</th><th>Kind</th><th>Domain</th><th>Connection</th><th>State</th><th>Progress</th><th>Started</th><th>Message</th><th></th></tr></thead><tbody></tbody></table>
<h2>Schedules <button id="schedule-add" class="write">Add schedule…</button></h2>
<table id="schedules"><thead><tr><th>Schedule</th><th>Runs</th><th>Domain</th><th>Connection</th><th>When</th><th>Repository</th><th>Retention</th><th>Next run</th><th></th></tr></thead><tbody></tbody></table>

<dialog id="restore-dialog">
<form method="dialog" id="restore-form">
  <h2>Restore backup <span id="restore-backup"></span> of <span id="restore-domain"></span></h2>
  <div class="row">
    <label><input type="radio" name="kind" value="to" checked> To a directory: new image files</label>
    <label><input type="radio" name="kind" value="define"> Define a new domain on restored images</label>
    <label><input type="radio" name="kind" value="into"> Into the disks of a shut-off domain (overwrites them)</label>
    <label><input type="radio" name="kind" value="instant"> Instant: run it at once while the data copies in</label>
  </div>
  <label>Connection <select id="restore-connection"></select></label>
  <label data-for="to define instant">Directory on the daemon's machine <input id="restore-to" size="40" placeholder="/var/lib/qbackup/restored"></label>
  <label data-for="define">New domain's name <input id="restore-define" size="30"></label>
  <label data-for="instant">Run as (default: the backed-up name) <input id="restore-as" size="30"></label>
  <label data-for="into">Domain whose disks are overwritten <input id="restore-into" size="30" list="domain-names"></label>
  <label data-for="to define">Format <select id="restore-format"><option>qcow2</option><option>raw</option></select></label>
  <p id="restore-error" class="err"></p>
  <menu><button value="cancel" formnovalidate>Cancel</button><button id="restore-submit" value="ok">Restore</button></menu>
</form>
</dialog>

<dialog id="schedule-dialog">
<form method="dialog" id="schedule-form">
  <h2 id="schedule-title">Add schedule</h2>
  <label>Runs <select id="schedule-action"><option value="backup">backup</option><option value="verify">verify</option><option value="gc">gc</option><option value="copy">copy</option></select></label>
  <label data-for="backup verify copy">Domain <input id="schedule-domain" size="30" list="domain-names"></label>
  <label data-for="backup">Connection <select id="schedule-connection"></select></label>
  <label>When <input id="schedule-when" size="24" placeholder="daily 02:00"> <span class="muted">cron, or "daily 02:00", "weekly sun 03:00", "hourly :15"</span></label>
  <label>Repository <select id="schedule-repo"></select> <input id="schedule-repo-other" size="24" placeholder="/backups" aria-label="Schedule repository location"></label>
  <label data-for="copy">Copy to <select id="schedule-to"></select></label>
  <label data-for="backup">Keep the last <input id="schedule-keep-last" type="number" min="1" size="4"> backups <span class="muted">(empty: keep all)</span></label>
  <label data-for="backup"><input id="schedule-full" type="checkbox"> Every run a full backup</label>
  <label data-for="verify">Read back <input id="schedule-read-data" type="number" min="1" max="100" size="4"> % of the data</label>
  <p id="schedule-error" class="err"></p>
  <menu><button value="cancel" formnovalidate>Cancel</button><button id="schedule-submit" value="ok">Save</button></menu>
</form>
</dialog>

<dialog id="task-log">
  <h2>Task <span id="task-log-id"></span> <span id="task-log-state"></span></h2>
  <p id="task-log-summary" class="muted"></p>
  <div id="task-log-lines"></div>
  <menu><button id="task-log-close">Close</button></menu>
</dialog>
<datalist id="domain-names"></datalist>

<script>
"use strict";
const $ = (id) => document.getElementById(id);
const tokenInput = $("token"), repoInput = $("repo"), repoChoice = $("repo-choice");
tokenInput.value = localStorage.getItem("qbackup.token") || "";
repoInput.value = localStorage.getItem("qbackup.repo") || "";
const following = new Set();
const OTHER = "_other";
let connections = [], repositories = { repositories: [], default: null, otherLocations: true }, knownDomains = [], schedulesById = new Map();

function esc(s) { return String(s).replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";"); }
function mib(n) { return (n / 1048576).toFixed(1) + " MiB"; }
function time(ms) { return ms ? new Date(ms).toLocaleString() : ""; }
/** Redraws an element only when its content changed. */
function setHtml(el, html) { if (el.dataset.html !== html) { el.innerHTML = html; el.dataset.html = html; } }
function connLabel(uri) { const c = connections.find((x) => x.uri === uri); return c && c.name ? c.name + " (" + uri + ")" : uri; }
function connOptions(selected) { return connections.map((c) => "<option value='" + esc(c.uri) + "'" + (c.uri === selected ? " selected" : "") + ">" + esc((c.name ? c.name + " — " : "") + c.uri + (c.default ? " (default)" : "")) + "</option>").join(""); }
function repoOptions(selected, withOther) {
  let html = repositories.repositories.map((r) => "<option value='" + esc(r.name) + "'" + (r.name === selected ? " selected" : "") + ">" + esc(r.name) + " — " + esc(r.location) + "</option>").join("");
  if (withOther && repositories.otherLocations) html += "<option value='" + OTHER + "'" + (selected && !repositories.repositories.some((r) => r.name === selected) ? " selected" : "") + ">other location…</option>";
  return html;
}

async function api(method, path, body) {
  const headers = { authorization: "Bearer " + tokenInput.value };
  if (body !== undefined) headers["content-type"] = "application/json";
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await res.json().catch(() => null);
  if (!res.ok) throw new Error(data && data.message ? data.message : res.status + " " + res.statusText);
  return data;
}

function showError(err) { $("error").textContent = err ? String(err.message || err) : ""; }

// ---- repository choice ----
function drawRepoChoice() {
  repoChoice.innerHTML = (repoInput.value ? "" : "<option value='' selected>choose…</option>") + repoOptions(repoInput.value, true);
  repoChoice.hidden = repositories.repositories.length === 0;
  repoInput.hidden = repositories.repositories.length > 0 && repoChoice.value !== OTHER;
}
repoChoice.addEventListener("change", () => {
  if (repoChoice.value === "") return;
  if (repoChoice.value === OTHER) { repoInput.value = ""; repoInput.hidden = false; repoInput.focus(); }
  else { repoInput.value = repoChoice.value; repoInput.hidden = true; }
});

// ---- domains ----
let inventory = null;
async function loadInventory() {
  inventory = null;
  if (!repoInput.value) return;
  try { inventory = await api("GET", "/api/repository/inventory?repo=" + encodeURIComponent(repoInput.value)); }
  catch (err) { inventory = { error: err.message, backups: [], damaged: [] }; }
}

async function renderDomains() {
  const last = new Map();
  for (const m of (inventory ? inventory.backups : [])) last.set(m.domain, m);
  const body = $("domains").tBodies[0];
  const seen = new Set(), problems = [];
  knownDomains = [];
  for (const c of connections) {
    let list;
    try { list = await api("GET", "/api/domains?all=true&connection=" + encodeURIComponent(c.uri)); }
    catch (err) { problems.push(connLabel(c.uri) + ": " + err.message); continue; }
    for (const d of list) {
      const key = c.uri + "\\n" + d.name;
      seen.add(key);
      knownDomains.push({ name: d.name, state: d.state, connection: c.uri });
      let row = [...body.rows].find((r) => r.dataset.key === key);
      if (!row) {
        row = body.insertRow();
        row.dataset.key = key; row.dataset.domain = d.name; row.dataset.connection = c.uri;
        row.innerHTML = "<td></td><td></td><td class='conn'></td><td></td><td></td><td><button class='write'>Back up now</button></td><td><progress max='1' value='0' hidden></progress> <span class='pct'></span></td>";
        row.querySelector("button").addEventListener("click", () => backUp(d.name, c.uri, row));
      }
      let disks = "";
      try { const info = await api("GET", "/api/domains/" + encodeURIComponent(d.name) + "?connection=" + encodeURIComponent(c.uri)); disks = info.disks.map((x) => x.target + " (" + x.format + ")").join(", "); }
      catch (err) { disks = err.message; }
      const m = last.get(d.name);
      row.cells[0].textContent = d.name;
      row.cells[1].textContent = d.state;
      row.cells[2].textContent = connLabel(c.uri);
      row.cells[3].textContent = disks;
      setHtml(row.cells[4], m ? esc(m.id) + "<br><span class='muted'>" + esc(m.time) + ", " + m.disks.map((x) => esc(x.target + ":" + x.level)).join(" ") + "</span>" : "<span class='muted'>none</span>");
    }
  }
  for (const row of [...body.rows]) if (!seen.has(row.dataset.key) && !problems.length) row.remove();
  $("connection-errors").textContent = problems.join("; ");
  setHtml($("domain-names"), [...new Set(knownDomains.map((d) => d.name))].map((n) => "<option value='" + esc(n) + "'>").join(""));
}

async function backUp(domain, connection, row) {
  showError(null);
  if (!repoInput.value) { showError("Choose a repository first"); return; }
  try {
    const task = await api("POST", "/api/repository/backups", { domain, connection, repo: repoInput.value });
    follow(task.id, row);
  } catch (err) { showError(err); }
}

async function follow(id, row) {
  if (following.has(id)) return;
  following.add(id);
  const bar = row.querySelector("progress"), pct = row.querySelector(".pct");
  bar.hidden = false; bar.value = 0;
  try {
    const res = await fetch("/api/tasks/" + encodeURIComponent(id) + "/events", { headers: { authorization: "Bearer " + tokenInput.value } });
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let i;
      while ((i = buffer.indexOf("\\n\\n")) >= 0) {
        const chunk = buffer.slice(0, i); buffer = buffer.slice(i + 2);
        const data = chunk.split("\\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\\n");
        if (!data) continue;
        const t = JSON.parse(data);
        if (t.progress && t.progress.totalBytes > 0) { bar.value = t.progress.doneBytes / t.progress.totalBytes; pct.textContent = t.progress.phase + " " + Math.round(100 * bar.value) + "%"; }
        if (t.endedMs) { bar.value = t.state === "succeeded" ? 1 : bar.value; pct.textContent = t.state + (t.error ? ": " + t.error.message : ""); }
      }
    }
  } catch (err) { showError(err); }
  following.delete(id);
  refresh();
}

async function renderChains() {
  const parts = [];
  for (const d of knownDomains.filter((x) => x.connection === "qbackup:///")) {
    const list = await api("GET", "/api/domains/" + encodeURIComponent(d.name) + "/checkpoints?topological=true");
    const shown = list.slice(-8);
    const boxes = [];
    for (const c of shown) {
      let cov = "";
      try {
        const disks = await api("GET", "/api/domains/" + encodeURIComponent(d.name) + "/checkpoints/" + encodeURIComponent(c.name) + "/coverage");
        cov = disks.map((x) => x.mode === "incremental" ? "<div class='inc'>" + esc(x.target) + ": incremental</div>" : "<div class='full' title='" + esc(x.reasons.map((r) => r.code + ": " + r.detail).join("; ")) + "'>" + esc(x.target) + ": full (" + esc(x.reasons.map((r) => r.code).join(", ")) + ")</div>").join("");
      } catch (err) { cov = "<div class='err'>" + esc(err.message) + "</div>"; }
      boxes.push("<div class='ckpt" + (c.current ? " current" : "") + "' data-checkpoint='" + esc(c.name) + "'><b>" + esc(c.name) + "</b>" + (c.parent ? " <span class='muted'>&larr; " + esc(c.parent) + "</span>" : "") + cov + "</div>");
    }
    parts.push("<div data-chain='" + esc(d.name) + "'><b>" + esc(d.name) + "</b>" + (list.length > shown.length ? " <span class='muted'>(" + (list.length - shown.length) + " older)</span>" : "") + "<div class='chain'>" + (boxes.length ? boxes.join("<span class='arrow'>&rarr;</span>") : "<span class='muted'>no checkpoints</span>") + "</div></div>");
  }
  setHtml($("chains"), parts.join("") || "<span class='muted'>no domains of qbackup's own</span>");
}

// ---- backups (damaged manifests marked, never hiding the others) ----
async function renderBackups() {
  const body = $("backups").tBodies[0];
  if (!repoInput.value) { setHtml(body, ""); $("stats").textContent = "Choose a repository to see its backups."; return; }
  if (!inventory || inventory.error) { $("stats").textContent = inventory ? inventory.error : ""; setHtml(body, ""); return; }
  try {
    const stats = await api("GET", "/api/repository/stats?repo=" + encodeURIComponent(repoInput.value));
    $("stats").textContent = stats.backups + " backups, " + mib(stats.logicalBytes) + " logical, " + mib(stats.storedChunkBytes) + " stored; dedup " + stats.dedupRatio.toFixed(2) + ", compression " + stats.compressionRatio.toFixed(2) + (inventory.damaged.length ? "; " + inventory.damaged.length + " damaged (run Verify, then qbackup verify --repair)" : "");
  } catch (err) { $("stats").textContent = err.message; }
  const rows = inventory.backups.map((m) => ({ domain: m.domain, id: m.id, html:
    "<tr data-backup='" + esc(m.id) + "'><td>" + esc(m.id) + "</td><td>" + esc(m.domain) + "</td><td>" + esc(m.time) + "</td><td>" + m.disks.map((x) => esc(x.target + ":" + x.level) + (x.fullReason ? " <span class='muted'>(" + esc(x.fullReason) + ")</span>" : "")).join(" ") +
    "</td><td>" + mib(m.disks.reduce((a, x) => a + x.bytesRead, 0)) + "</td><td>" + mib(m.disks.reduce((a, x) => a + x.bytesStored, 0)) + "</td><td><button class='write' data-restore='" + esc(m.id) + "' data-domain='" + esc(m.domain) + "'>Restore…</button></td></tr>" }));
  for (const d of inventory.damaged) rows.push({ domain: d.domain, id: d.id, html:
    "<tr class='damaged' data-damaged='" + esc(d.id) + "'><td>" + esc(d.id) + " <span class='badge damaged'>damaged</span></td><td>" + esc(d.domain) + "</td><td colspan='5' class='err'>" + esc(d.problem) + "</td></tr>" });
  rows.sort((a, b) => a.domain.localeCompare(b.domain) || b.id.localeCompare(a.id));
  setHtml(body, rows.map((r) => r.html).join(""));
}

$("backups").tBodies[0].addEventListener("click", (e) => {
  const b = e.target.closest("button[data-restore]");
  if (b) openRestore(b.dataset.domain, b.dataset.restore);
});

// ---- restore dialog ----
let restoring = null;
function restoreKind() { return document.querySelector("#restore-form input[name=kind]:checked").value; }
function showFor(form, value) { for (const el of form.querySelectorAll("[data-for]")) el.hidden = !el.dataset.for.split(" ").includes(value); }
for (const r of document.querySelectorAll("#restore-form input[name=kind]")) r.addEventListener("change", () => showFor($("restore-form"), restoreKind()));
function openRestore(domain, backup) {
  restoring = { domain, backup };
  $("restore-backup").textContent = backup; $("restore-domain").textContent = domain;
  const known = knownDomains.find((d) => d.name === domain);
  $("restore-connection").innerHTML = connOptions(known ? known.connection : (connections[0] || {}).uri);
  $("restore-error").textContent = "";
  if (!$("restore-into").value) $("restore-into").value = domain;
  if (!$("restore-define").value) $("restore-define").value = domain + "-restored";
  showFor($("restore-form"), restoreKind());
  $("restore-dialog").showModal();
}
$("restore-form").addEventListener("submit", async (e) => {
  if (e.submitter && e.submitter.value === "cancel") return;
  e.preventDefault();
  const kind = restoreKind(), r = restoring;
  const body = { domain: r.domain, repo: repoInput.value, backup: r.backup, connection: $("restore-connection").value };
  const to = $("restore-to").value.trim();
  let path = "/api/repository/restore";
  if (kind === "to" || kind === "define") { body.to = to; body.format = $("restore-format").value; }
  if (kind === "define") body.define = $("restore-define").value.trim();
  if (kind === "into") body.intoDomain = $("restore-into").value.trim();
  if (kind === "instant") { path = "/api/repository/restore-instant"; if (to) body.to = to; if ($("restore-as").value.trim()) body.as = $("restore-as").value.trim(); }
  $("restore-submit").disabled = true;
  try { const res = await api("POST", path, body); $("restore-dialog").close(); showError(null); if (res && res.id) openTaskLog(res.id); refresh(); }
  catch (err) { $("restore-error").textContent = err.message; }
  finally { $("restore-submit").disabled = false; }
});

$("verify").addEventListener("click", async () => {
  if (!repoInput.value) { showError("Choose a repository first"); return; }
  try { const t = await api("POST", "/api/repository/verify", { repo: repoInput.value }); openTaskLog(t.id); refresh(); } catch (err) { showError(err); }
});

// ---- tasks and their logs ----
async function renderTasks() {
  const tasks = await api("GET", "/api/tasks?limit=20");
  setHtml($("tasks").tBodies[0], tasks.map((t) => {
    const p = t.progress && t.progress.totalBytes > 0 ? "<progress max='1' value='" + (t.progress.doneBytes / t.progress.totalBytes) + "'></progress> " + mib(t.progress.doneBytes) + " / " + mib(t.progress.totalBytes) : "";
    const msg = t.error ? t.error.message : (t.log.length ? t.log[t.log.length - 1].message : "");
    return "<tr data-task='" + esc(t.id) + "'><td>" + esc(t.id) + "</td><td>" + esc(t.kind) + "</td><td>" + esc(t.domain || "") + "</td><td class='conn'>" + esc(t.connection ? connLabel(t.connection) : "") + "</td><td class='state-" + esc(t.state) + "'>" + esc(t.state) + "</td><td>" + p + "</td><td>" + esc(time(t.startedMs)) + "</td><td>" + esc(msg) + "</td><td><button data-log='" + esc(t.id) + "'>Log</button></td></tr>";
  }).join(""));
  for (const t of tasks) {
    if (t.state !== "running" && t.state !== "queued") continue;
    const row = t.domain && $("domains").tBodies[0].querySelector('tr[data-domain="' + CSS.escape(t.domain) + '"]');
    if (row && t.kind === "repository.backup") follow(t.id, row);
  }
  if ($("task-log").open) drawTaskLog(await api("GET", "/api/tasks/" + encodeURIComponent($("task-log").dataset.task)));
}
$("tasks").tBodies[0].addEventListener("click", (e) => { const b = e.target.closest("button[data-log]"); if (b) openTaskLog(b.dataset.log); });
function drawTaskLog(t) {
  $("task-log-id").textContent = t.id;
  $("task-log-state").textContent = t.state; $("task-log-state").className = "state-" + t.state;
  $("task-log-summary").textContent = t.kind + (t.domain ? " of " + t.domain : "") + (t.connection ? " on " + connLabel(t.connection) : "") + (t.requestedBy ? ", requested by " + t.requestedBy : "") + (t.startedMs ? ", started " + time(t.startedMs) : "") + (t.endedMs ? ", ended " + time(t.endedMs) : "");
  const lines = t.log.map((l) => new Date(l.timeMs).toLocaleTimeString() + "  " + l.message);
  if (t.error) lines.push("ERROR " + t.error.code + ": " + t.error.message);
  $("task-log-lines").textContent = lines.join("\\n");
}
async function openTaskLog(id) {
  try { const t = await api("GET", "/api/tasks/" + encodeURIComponent(id)); $("task-log").dataset.task = id; drawTaskLog(t); if (!$("task-log").open) $("task-log").showModal(); }
  catch (err) { showError(err); }
}
$("task-log-close").addEventListener("click", () => $("task-log").close());

// ---- schedules ----
async function renderSchedules() {
  const list = await api("GET", "/api/schedules");
  schedulesById = new Map(list.map((s) => [s.id, s]));
  const repoLabel = (loc) => { const r = repositories.repositories.find((x) => x.location === loc); return r ? r.name : loc; };
  setHtml($("schedules").tBodies[0], list.map((s) => {
    const fromConfig = s.id.startsWith("config-");
    return "<tr data-schedule='" + esc(s.id) + "'><td>" + esc(s.name || s.id) + (fromConfig ? " <span class='muted'>(configuration file)</span>" : "") + (s.paused ? " <span class='badge paused'>paused</span>" : "") + "</td><td>" + esc(s.action || "backup") + (s.full ? " (full)" : "") + "</td><td>" + esc(s.domain || "") + "</td><td class='conn'>" + esc(s.connection ? connLabel(s.connection) : ((s.action || "backup") === "backup" ? "default" : "")) + "</td><td>" + esc(s.when) + "</td><td>" + esc(s.to ? repoLabel(s.repo) + " → " + repoLabel(s.to) : repoLabel(s.repo)) + "</td><td>" + esc(Object.entries(s.retention || {}).map(([k, v]) => k + " " + v).join(", ")) + "</td><td>" + esc(s.paused ? "paused" : time(s.nextRunMs)) + "</td><td>" +
      "<button class='write' data-act='run'>Run now</button> " + (fromConfig ? "" : "<button class='write' data-act='edit'>Edit…</button> ") + "<button class='write' data-act='" + (s.paused ? "resume'>Resume" : "pause'>Pause") + "</button>" + (fromConfig ? "" : " <button class='write' data-act='remove'>Remove</button>") + "</td></tr>";
  }).join(""));
}
$("schedules").tBodies[0].addEventListener("click", async (e) => {
  const b = e.target.closest("button[data-act]");
  if (!b) return;
  const id = b.closest("tr").dataset.schedule, act = b.dataset.act;
  showError(null);
  try {
    if (act === "edit") { openSchedule(schedulesById.get(id)); return; }
    if (act === "remove" && !confirm("Remove schedule " + id + "? Its backups stay.")) return;
    if (act === "run") { const t = await api("POST", "/api/schedules/" + encodeURIComponent(id) + "/run"); const row = t.domain && $("domains").tBodies[0].querySelector('tr[data-domain="' + CSS.escape(t.domain) + '"]'); if (row && t.kind === "repository.backup") follow(t.id, row); }
    else if (act === "remove") await api("DELETE", "/api/schedules/" + encodeURIComponent(id));
    else await api("POST", "/api/schedules/" + encodeURIComponent(id) + "/" + act);
    refresh();
  } catch (err) { showError(err); }
});
let editing = null;
function scheduleAction() { return $("schedule-action").value; }
$("schedule-action").addEventListener("change", () => showFor($("schedule-form"), scheduleAction()));
// A domain known on one connection only: that connection.
$("schedule-domain").addEventListener("change", () => {
  const on = knownDomains.filter((d) => d.name === $("schedule-domain").value.trim());
  if (on.length === 1) $("schedule-connection").value = on[0].connection;
});
$("schedule-repo").addEventListener("change", () => { $("schedule-repo-other").hidden = $("schedule-repo").value !== OTHER; });
function openSchedule(s) {
  editing = s || null;
  $("schedule-title").textContent = s ? "Change schedule " + s.id : "Add schedule";
  $("schedule-action").value = s ? (s.action || "backup") : "backup";
  $("schedule-domain").value = s ? (s.domain || "") : "";
  $("schedule-connection").innerHTML = "<option value=''>the daemon's default</option>" + connOptions(s ? s.connection : undefined);
  $("schedule-when").value = s ? s.when : "";
  const repoName = (loc) => { const r = repositories.repositories.find((x) => x.location === loc); return r ? r.name : loc; };
  const current = s ? repoName(s.repo) : (repositories.repositories.some((r) => r.name === repoInput.value) ? repoInput.value : repositories.default);
  $("schedule-repo").innerHTML = repoOptions(current, true);
  $("schedule-repo-other").value = s && current === s.repo ? s.repo : (repositories.repositories.length ? "" : repoInput.value);
  $("schedule-repo-other").hidden = $("schedule-repo").value !== OTHER && repositories.repositories.length > 0;
  if (repositories.repositories.length === 0) $("schedule-repo").hidden = true;
  $("schedule-to").innerHTML = repoOptions(s && s.to ? repoName(s.to) : undefined, false);
  $("schedule-keep-last").value = s && s.retention && s.retention.keepLast ? s.retention.keepLast : "";
  $("schedule-full").checked = !!(s && s.full);
  $("schedule-read-data").value = s && s.readDataPercent ? s.readDataPercent : "";
  $("schedule-error").textContent = "";
  showFor($("schedule-form"), scheduleAction());
  $("schedule-dialog").showModal();
}
$("schedule-add").addEventListener("click", () => openSchedule(null));
$("schedule-form").addEventListener("submit", async (e) => {
  if (e.submitter && e.submitter.value === "cancel") return;
  e.preventDefault();
  const action = scheduleAction();
  const repo = $("schedule-repo").hidden || $("schedule-repo").value === OTHER ? $("schedule-repo-other").value.trim() : $("schedule-repo").value;
  const body = { action, when: $("schedule-when").value.trim(), repo };
  const domain = $("schedule-domain").value.trim();
  if (domain && action !== "gc") body.domain = domain;
  if (action === "backup") {
    if ($("schedule-connection").value) body.connection = $("schedule-connection").value;
    // The dialog shows keep-last; other rules of the schedule stay.
    const retention = Object.assign({}, editing && editing.retention);
    delete retention.keepLast;
    const keep = Number($("schedule-keep-last").value);
    if (keep > 0) retention.keepLast = keep;
    if (Object.keys(retention).length) body.retention = retention;
    if ($("schedule-full").checked) body.full = true;
  }
  if (action === "verify" && Number($("schedule-read-data").value) > 0) body.readDataPercent = Number($("schedule-read-data").value);
  if (action === "copy") body.to = $("schedule-to").value;
  // What the dialog does not show stays as it was.
  if (editing && editing.passwordFile) body.passwordFile = editing.passwordFile;
  if (editing && editing.toPasswordFile && action === "copy") body.toPasswordFile = editing.toPasswordFile;
  $("schedule-submit").disabled = true;
  try {
    if (editing) await api("PUT", "/api/schedules/" + encodeURIComponent(editing.id), body);
    else await api("POST", "/api/schedules", body);
    $("schedule-dialog").close(); refresh();
  } catch (err) { $("schedule-error").textContent = err.message; }
  finally { $("schedule-submit").disabled = false; }
});

let refreshing = false, again = false;
async function refresh() {
  if (!tokenInput.value) { $("who").textContent = "enter a token (qbackup token create NAME)"; return; }
  // One refresh at a time; one asked for meanwhile runs right after (it may follow a change).
  if (refreshing) { again = true; return; }
  refreshing = true;
  try {
    const who = await api("GET", "/api/whoami");
    $("who").textContent = "signed in as " + who.name + (who.readOnly ? " (read-only)" : "");
    document.body.classList.toggle("readonly", !!who.readOnly);
    [connections, repositories] = await Promise.all([api("GET", "/api/connections"), api("GET", "/api/repositories")]);
    if (!repoInput.value && repositories.default) repoInput.value = repositories.default;
    if (!repoChoice.matches(":focus")) drawRepoChoice();
    await loadInventory();
    await renderDomains();
    await renderTasks();
    await renderChains();
    await renderBackups();
    await renderSchedules();
    document.body.dataset.ready = "1";
    document.body.dataset.repository = repoInput.value;
  } catch (err) { showError(err); }
  finally { refreshing = false; }
  if (again) { again = false; refresh(); }
}

$("save").addEventListener("click", () => {
  localStorage.setItem("qbackup.token", tokenInput.value);
  localStorage.setItem("qbackup.repo", repoInput.value);
  showError(null);
  refresh();
});
refresh();
setInterval(refresh, 5000);
</script>
<script>${FILE_BROWSER_SCRIPT}</script>
</body>
</html>
`;
