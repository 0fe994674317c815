// The web page for people, served at / by the daemon: one static HTML
// document with inline script and style (no framework, no CDN, works
// offline). It asks for an API token (kept in the browser's localStorage),
// then shows domains with their state, disks and last backup in the chosen
// repository, a "Back up now" button whose progress bar follows the task's
// event stream, each domain's checkpoint chain with, per disk, whether an
// incremental since each checkpoint is possible and why not, the backups
// with their sizes and the repository's dedup, Verify and Restore buttons,
// the recent tasks and the schedules.

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
  input { font: inherit; padding: .2em .4em; }
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
</style>
</head>
<body>
<h1>qbackup</h1>
<div id="settings">
  <label>API token <input id="token" type="password" size="40" autocomplete="off"></label>
  <label>Repository <input id="repo" size="30" placeholder="/backups"></label>
  <button id="save">Use</button>
  <span id="who" class="muted"></span>
</div>
<p id="error" class="err"></p>
<h2>Domains</h2>
<table id="domains"><thead><tr><th>Name</th><th>State</th><th>Disks</th><th>Last backup</th><th></th><th>Progress</th></tr></thead><tbody></tbody></table>
<h2>Checkpoint chains</h2>
<p class="muted">Per disk: can a backup since the checkpoint be incremental, and if not, why (the newest 8 checkpoints of each domain).</p>
<div id="chains"></div>
<h2>Backups <button id="verify">Verify repository</button></h2>
<p id="stats" class="muted"></p>
<table id="backups"><thead><tr><th>Backup</th><th>Domain</th><th>Time</th><th>Disks</th><th>Read</th><th>Stored</th><th></th></tr></thead><tbody></tbody></table>
${FILE_BROWSER_HTML}<h2>Tasks</h2>
<table id="tasks"><thead><tr><th>Task</th><th>Kind</th><th>Domain</th><th>State</th><th>Progress</th><th>Started</th><th>Message</th></tr></thead><tbody></tbody></table>
<h2>Schedules</h2>
<table id="schedules"><thead><tr><th>Id</th><th>Domain</th><th>When</th><th>Repository</th><th>Retention</th><th>Next run</th></tr></thead><tbody></tbody></table>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const tokenInput = $("token"), repoInput = $("repo");
tokenInput.value = localStorage.getItem("qbackup.token") || "";
repoInput.value = localStorage.getItem("qbackup.repo") || "";
const following = new Set();

function esc(s) { return String(s).replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";"); }
function mib(n) { return (n / 1048576).toFixed(1) + " MiB"; }
function time(ms) { return ms ? new Date(ms).toLocaleString() : ""; }

async function api(method, path, body) {
  const headers = { authorization: "Bearer " + tokenInput.value };
  if (body !== undefined) headers["content-type"] = "application/json";
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await res.json().catch(() => null);
  if (!res.ok) throw new Error(data && data.message ? data.message : res.status + " " + res.statusText);
  return data;
}

function showError(err) { $("error").textContent = err ? String(err.message || err) : ""; }

async function lastBackups() {
  if (!repoInput.value) return new Map();
  try {
    const list = await api("GET", "/api/repository/backups?repo=" + encodeURIComponent(repoInput.value));
    const last = new Map();
    for (const m of list) last.set(m.domain, m);
    return last;
  } catch (err) { return new Map(); }
}

async function renderDomains(domains) {
  const last = await lastBackups();
  const body = $("domains").tBodies[0];
  for (const d of domains) {
    let row = body.querySelector('tr[data-domain="' + CSS.escape(d.name) + '"]');
    if (!row) {
      row = body.insertRow();
      row.dataset.domain = d.name;
      row.innerHTML = "<td></td><td></td><td></td><td></td><td><button>Back up now</button></td><td><progress max='1' value='0' hidden></progress> <span class='pct'></span></td>";
      row.querySelector("button").addEventListener("click", () => backUp(d.name, row));
    }
    const info = await api("GET", "/api/domains/" + encodeURIComponent(d.name));
    const m = last.get(d.name);
    row.cells[0].textContent = d.name;
    row.cells[1].textContent = d.state;
    row.cells[2].textContent = info.disks.map((x) => x.target + " (" + x.format + ")").join(", ");
    row.cells[3].innerHTML = m ? esc(m.id) + "<br><span class='muted'>" + esc(m.time) + ", " + m.disks.map((x) => esc(x.target + ":" + x.level)).join(" ") + "</span>" : "<span class='muted'>none</span>";
  }
}

async function backUp(domain, row) {
  showError(null);
  if (!repoInput.value) { showError("Set a repository first"); return; }
  try {
    const task = await api("POST", "/api/repository/backups", { domain, repo: repoInput.value });
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

async function renderChains(domains) {
  const parts = [];
  for (const d of domains) {
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
  $("chains").innerHTML = parts.join("");
}

async function renderBackups() {
  if (!repoInput.value) { $("backups").tBodies[0].innerHTML = ""; $("stats").textContent = "Set a repository to see its backups."; return; }
  const q = "?repo=" + encodeURIComponent(repoInput.value);
  let list, stats;
  try { [list, stats] = await Promise.all([api("GET", "/api/repository/backups" + q), api("GET", "/api/repository/stats" + q)]); }
  catch (err) { $("stats").textContent = err.message; $("backups").tBodies[0].innerHTML = ""; return; }
  $("stats").textContent = stats.backups + " backups, " + mib(stats.logicalBytes) + " logical, " + mib(stats.storedChunkBytes) + " stored; dedup " + stats.dedupRatio.toFixed(2) + ", compression " + stats.compressionRatio.toFixed(2);
  $("backups").tBodies[0].innerHTML = list.slice().reverse().map((m) =>
    "<tr data-backup='" + esc(m.id) + "'><td>" + esc(m.id) + "</td><td>" + esc(m.domain) + "</td><td>" + esc(m.time) + "</td><td>" + m.disks.map((x) => esc(x.target + ":" + x.level) + (x.fullReason ? " <span class='muted'>(" + esc(x.fullReason) + ")</span>" : "")).join(" ") +
    "</td><td>" + mib(m.disks.reduce((a, x) => a + x.bytesRead, 0)) + "</td><td>" + mib(m.disks.reduce((a, x) => a + x.bytesStored, 0)) + "</td><td><button data-restore='" + esc(m.id) + "' data-domain='" + esc(m.domain) + "'>Restore…</button></td></tr>").join("");
  for (const b of $("backups").querySelectorAll("button[data-restore]")) b.addEventListener("click", () => restore(b.dataset.domain, b.dataset.restore));
}

async function restore(domain, backup) {
  const to = prompt("Restore backup " + backup + " of " + domain + " as qcow2 images into this directory (on the daemon's machine):");
  if (!to) return;
  try { await api("POST", "/api/repository/restore", { domain, repo: repoInput.value, backup, to }); refresh(); } catch (err) { showError(err); }
}

$("verify").addEventListener("click", async () => {
  if (!repoInput.value) { showError("Set a repository first"); return; }
  try { await api("POST", "/api/repository/verify", { repo: repoInput.value }); refresh(); } catch (err) { showError(err); }
});

async function renderTasks() {
  const tasks = await api("GET", "/api/tasks?limit=20");
  $("tasks").tBodies[0].innerHTML = tasks.map((t) => {
    const p = t.progress && t.progress.totalBytes > 0 ? "<progress max='1' value='" + (t.progress.doneBytes / t.progress.totalBytes) + "'></progress> " + mib(t.progress.doneBytes) + " / " + mib(t.progress.totalBytes) : "";
    const msg = t.error ? t.error.message : (t.log.length ? t.log[t.log.length - 1].message : "");
    return "<tr><td>" + esc(t.id) + "</td><td>" + esc(t.kind) + "</td><td>" + esc(t.domain || "") + "</td><td class='state-" + esc(t.state) + "'>" + esc(t.state) + "</td><td>" + p + "</td><td>" + esc(time(t.startedMs)) + "</td><td>" + esc(msg) + "</td></tr>";
  }).join("");
  for (const t of tasks) {
    if (t.state !== "running" && t.state !== "queued") continue;
    const row = t.domain && $("domains").tBodies[0].querySelector('tr[data-domain="' + CSS.escape(t.domain) + '"]');
    if (row && t.kind === "repository.backup") follow(t.id, row);
  }
}

async function renderSchedules() {
  const list = await api("GET", "/api/schedules");
  $("schedules").tBodies[0].innerHTML = list.map((s) =>
    "<tr><td>" + esc(s.id) + "</td><td>" + esc(s.domain) + "</td><td>" + esc(s.when) + "</td><td>" + esc(s.to ? s.repo + " → " + s.to + " (copy)" : s.repo) + "</td><td>" + esc(JSON.stringify(s.retention || {})) + "</td><td>" + esc(time(s.nextRunMs)) + "</td></tr>").join("");
}

let refreshing = false;
async function refresh() {
  if (!tokenInput.value) { $("who").textContent = "enter a token (qbackup token create NAME)"; return; }
  if (refreshing) return;
  refreshing = true;
  try {
    const who = await api("GET", "/api/whoami");
    $("who").textContent = "signed in as " + who.name + (who.readOnly ? " (read-only)" : "");
    const domains = await api("GET", "/api/domains?all=true");
    await renderDomains(domains);
    await renderTasks();
    await renderChains(domains);
    await renderBackups();
    await renderSchedules();
    document.body.dataset.ready = "1";
  } catch (err) { showError(err); }
  finally { refreshing = false; }
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
