// The web page for people, served at / by the daemon: one static HTML
// document with inline script and style (no framework, no CDN, works
// offline). It asks for an API token (kept in the browser's localStorage),
// then shows domains with their state, disks and last backup in the chosen
// repository, a "Back up now" button whose progress bar follows the task's
// event stream, the recent tasks and the schedules.

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
<h2>Tasks</h2>
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

async function renderDomains() {
  const [domains, last] = await Promise.all([api("GET", "/api/domains?all=true"), lastBackups()]);
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
    "<tr><td>" + esc(s.id) + "</td><td>" + esc(s.domain) + "</td><td>" + esc(s.when) + "</td><td>" + esc(s.repo) + "</td><td>" + esc(JSON.stringify(s.retention || {})) + "</td><td>" + esc(time(s.nextRunMs)) + "</td></tr>").join("");
}

async function refresh() {
  if (!tokenInput.value) { $("who").textContent = "enter a token (qbackup token create NAME)"; return; }
  try {
    const who = await api("GET", "/api/whoami");
    $("who").textContent = "signed in as " + who.name + (who.readOnly ? " (read-only)" : "");
    await renderDomains();
    await renderTasks();
    await renderSchedules();
    document.body.dataset.ready = "1";
  } catch (err) { showError(err); }
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
</body>
</html>
`;
