// The page's file browser (inserted into page.ts): a "Files…" button on each
// backup row opens that backup's tree, with breadcrumbs, sizes and dates,
// a download per file (fetched with the token, saved through a blob link)
// and "Restore selected" into a directory of the daemon's host (a task).
// Every name from the guest is hostile: it reaches the DOM only through
// textContent or esc(), never as markup. It keeps to itself: it only adds
// buttons to rows the page draws (a MutationObserver) and uses the page's
// api(), esc() and showError().

export const FILE_BROWSER_HTML = `<section id="files" hidden>
<h2>Files of backup <span id="files-backup"></span> <button id="files-close">Close</button></h2>
<p><span id="files-crumbs"></span> <span id="files-status" class="muted"></span></p>
<table id="files-table"><thead><tr><th><input type="checkbox" id="files-all" title="select all"></th><th>Name</th><th>Size</th><th>Modified</th><th>Mode</th><th>Owner</th><th></th></tr></thead><tbody></tbody></table>
<p><button id="files-restore" class="write">Restore selected…</button> <span id="files-result" class="muted"></span></p>
</section>
`;

export const FILE_BROWSER_SCRIPT = `
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const state = { backup: null, domain: null, path: "/" };
  function size(n) { return n < 1024 ? n + " B" : n < 1048576 ? (n / 1024).toFixed(1) + " KiB" : n < 1073741824 ? (n / 1048576).toFixed(1) + " MiB" : (n / 1073741824).toFixed(2) + " GiB"; }
  function query(extra) {
    let q = "?repo=" + encodeURIComponent(repoInput.value) + "&domain=" + encodeURIComponent(state.domain);
    for (const [k, v] of Object.entries(extra)) q += "&" + k + "=" + encodeURIComponent(v);
    return q;
  }
  function join(dir, name) { return dir === "/" ? "/" + name : dir + "/" + name; }

  async function open(backup, domain) {
    state.backup = backup; state.domain = domain;
    $("files").hidden = false;
    $("files-backup").textContent = backup + " (" + domain + ")";
    $("files-result").textContent = "";
    await show("/");
    $("files").scrollIntoView();
  }

  async function show(path) {
    state.path = path;
    const body = $("files-table").tBodies[0];
    $("files-status").textContent = "loading… (the first listing of a backup starts a small VM)";
    $("files-all").checked = false;
    let list;
    try { list = await api("GET", "/api/repository/backups/" + encodeURIComponent(state.backup) + "/files" + query({ path })); }
    catch (err) { $("files-status").textContent = ""; showError(err); return; }
    $("files-status").textContent = list.entries.length + " entries";
    const crumbs = $("files-crumbs");
    crumbs.textContent = "";
    const parts = list.path === "/" ? [] : list.path.slice(1).split("/");
    const addCrumb = (label, target) => {
      const a = document.createElement("a");
      a.href = "#"; a.textContent = label; a.dataset.path = target;
      a.addEventListener("click", (e) => { e.preventDefault(); show(target); });
      crumbs.append(a);
    };
    addCrumb("/", "/");
    parts.forEach((p, i) => { if (i > 0) crumbs.append(" / "); else crumbs.append(" "); addCrumb(p, "/" + parts.slice(0, i + 1).join("/")); });
    body.textContent = "";
    for (const e of list.entries) {
      const row = body.insertRow();
      row.dataset.path = e.path;
      const cells = [0, 1, 2, 3, 4, 5, 6].map(() => row.insertCell());
      const box = document.createElement("input");
      box.type = "checkbox"; box.className = "files-pick"; box.dataset.path = e.path;
      cells[0].append(box);
      if (e.type === "directory") {
        const a = document.createElement("a");
        a.href = "#"; a.textContent = e.name + "/"; a.className = "files-dir";
        a.addEventListener("click", (ev) => { ev.preventDefault(); show(e.path); });
        cells[1].append(a);
      } else {
        cells[1].textContent = e.name + (e.type === "symlink" ? " → " + e.link : "");
      }
      cells[2].textContent = e.type === "directory" ? "" : size(e.size);
      cells[3].textContent = new Date(e.mtime).toLocaleString();
      cells[4].textContent = e.modeString;
      cells[5].textContent = e.uid + ":" + e.gid;
      if (e.type === "file") {
        const b = document.createElement("button");
        b.textContent = "Download"; b.className = "files-download"; b.dataset.path = e.path;
        b.addEventListener("click", () => download(e));
        cells[6].append(b);
      }
    }
  }

  async function download(e) {
    try {
      const res = await fetch("/api/repository/backups/" + encodeURIComponent(state.backup) + "/files/content" + query({ path: e.path }), { headers: { authorization: "Bearer " + tokenInput.value } });
      if (!res.ok) { const d = await res.json().catch(() => null); throw new Error(d && d.message ? d.message : res.status + " " + res.statusText); }
      const url = URL.createObjectURL(await res.blob());
      const a = document.createElement("a");
      a.href = url; a.download = e.name;
      document.body.append(a); a.click(); a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } catch (err) { showError(err); }
  }

  $("files-all").addEventListener("change", () => { for (const b of document.querySelectorAll(".files-pick")) b.checked = $("files-all").checked; });
  $("files-close").addEventListener("click", () => { $("files").hidden = true; });
  $("files-restore").addEventListener("click", async () => {
    const paths = [...document.querySelectorAll(".files-pick")].filter((b) => b.checked).map((b) => b.dataset.path);
    if (paths.length === 0) { showError("Select files or directories first"); return; }
    const to = prompt("Copy " + paths.length + " selected item(s) into this directory (on the daemon's machine):");
    if (!to) return;
    try {
      const task = await api("POST", "/api/repository/backups/" + encodeURIComponent(state.backup) + "/files/restore", { repo: repoInput.value, domain: state.domain, paths, to });
      $("files-result").textContent = "task " + task.id + " copies " + paths.length + " item(s) into " + to;
      refresh();
    } catch (err) { showError(err); }
  });

  // A "Files…" button on every backup row the page draws.
  const addButtons = () => {
    for (const row of document.querySelectorAll("#backups tr[data-backup]")) {
      if (row.querySelector("button.files-open")) continue;
      const restore = row.querySelector("button[data-restore]");
      if (!restore) continue;
      const b = document.createElement("button");
      b.textContent = "Files…"; b.className = "files-open";
      b.addEventListener("click", () => open(restore.dataset.restore, restore.dataset.domain));
      restore.after(" ", b);
    }
  };
  new MutationObserver(addButtons).observe($("backups").tBodies[0], { childList: true });
})();
`;
