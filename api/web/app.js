// Safehold's web page: plain JavaScript, no build step. Every value from the API is put
// in the page as text (never as HTML). The token lives in sessionStorage (this tab only)
// and goes out as an Authorization header; live progress is read from the job's SSE
// stream with fetch (EventSource cannot send headers); downloads use one-use tickets.
"use strict";

const ROLES = { viewer: 1, operator: 2, admin: 3 };
const TERMINAL = ["succeeded", "failed", "cancelled"];
let token = sessionStorage.getItem("safehold-token") || "";
let me = null;
let selected = null;
const following = new Set();

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "onclick") node.addEventListener("click", v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + token, "X-Safehold-Client": "web" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method, headers,
    body: body === undefined ? undefined : JSON.stringify(body) });
  const doc = await res.json().catch(() => ({}));
  if (!res.ok) {
    const err = (doc && doc.error) || {};
    throw new Error(`${err.code || res.status}: ${err.message || res.statusText}`);
  }
  return doc;
}

function mib(n) {
  if (n === null || n === undefined) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

function age(iso) {
  if (!iso) return "never";
  const s = (Date.now() - Date.parse(iso)) / 1000;
  if (s < 90) return `${Math.max(0, Math.round(s))} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 129600) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} days ago`;
}

function roleOn(target) {
  return ROLES[(me && me.targets[target]) || ""] || 0;
}

function showForRole(root, role) {
  for (const node of root.querySelectorAll("[data-role]")) {
    node.hidden = role < ROLES[node.dataset.role];
  }
}

function confirmAction(text) {
  const dialog = $("#confirm");
  $("#confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"),
                            { once: true });
    dialog.showModal();
  });
}

function say(text, cls) {
  const status = $("#upload-status");
  status.textContent = text;
  status.className = cls || "";
}

// ------------------------------------------------------------------ login
async function login(candidate) {
  token = candidate.trim();
  try {
    me = await api("GET", "/api/v1/whoami");
  } catch (e) {
    token = "";
    sessionStorage.removeItem("safehold-token");
    $("#login-error").textContent = e.message;
    return;
  }
  sessionStorage.setItem("safehold-token", token);
  $("#login").hidden = true;
  $("#app").hidden = false;
  $("#logout").hidden = false;
  $("#who").textContent = `${me.subject} (${me.role || "scoped roles"})`;
  const admin = ROLES[me.role || ""] >= ROLES.admin ||
    Object.values(me.targets).includes("admin");
  $("#audit-view").hidden = !admin;
  await refresh();
}

function logout() {
  sessionStorage.removeItem("safehold-token");
  location.reload();
}

async function refresh() {
  await Promise.all([loadTargets(), loadJobs(), loadAudit()]);
  if (selected) await selectTarget(selected);
}

// ------------------------------------------------------------------ targets
async function loadTargets() {
  const [targets, schedules] = await Promise.all([
    api("GET", "/api/v1/targets"), api("GET", "/api/v1/schedules")]);
  const bySchedule = Object.fromEntries(schedules.schedules.map((s) => [s.target, s]));
  const body = $("#targets tbody");
  body.replaceChildren();
  for (const t of targets.targets) {
    const s = bySchedule[t.id] || {};
    const row = el("tr", { "data-target": t.id, class: t.id === selected ? "selected" : null },
      el("td", {}, el("a", { href: "#", onclick: (e) => { e.preventDefault(); selectTarget(t.id); } },
                      t.id)),
      el("td", {}, t.engine),
      el("td", {}, t.schedule ? `${t.schedule} (next ${age(s.next_run).replace(" ago", "")})`
                              : "—"),
      el("td", { class: "last-backup" }, "…"),
      el("td", { class: "last-drill" }, "…"),
      el("td", { class: "health" }, "…"));
    body.append(row);
    api("GET", `/api/v1/targets/${encodeURIComponent(t.id)}/backups`).then((doc) => {
      const newest = doc.backups.find((b) => b.kind === "backup");
      row.querySelector(".last-backup").textContent =
        newest ? `${age(newest.created_at)} (${mib(newest.size_bytes)})` : "none yet";
      const drilled = doc.backups.find((b) => b.verification);
      row.querySelector(".last-drill").textContent = drilled
        ? `${drilled.verification.outcome} ${age(drilled.verified_at)}` : "none";
      // health in words: what an operator must act on first
      const health = row.querySelector(".health");
      const problems = [];
      if (s.missed_since) problems.push(`scheduled backups missed (alert ${age(s.missed_since)})`);
      if (s.last_status === "failed") problems.push(`last scheduled backup failed (${s.last_error})`);
      if (drilled && drilled.verification.outcome !== "passed") problems.push("last drill failed");
      if (!newest) problems.push("no backup yet");
      health.textContent = problems.length ? problems.join("; ") : "ok";
      health.className = "health " + (problems.length ? "error" : "ok");
    }).catch(() => { row.querySelector(".last-backup").textContent = "?"; });
  }
}

async function selectTarget(id) {
  selected = id;
  for (const row of document.querySelectorAll("#targets tbody tr")) {
    row.classList.toggle("selected", row.dataset.target === id);
  }
  $("#target-view").hidden = false;
  $("#target-name").textContent = id;
  const role = roleOn(id);
  showForRole($("#target-view"), role);
  const doc = await api("GET", `/api/v1/targets/${encodeURIComponent(id)}/backups`);
  const body = $("#backups tbody");
  body.replaceChildren();
  for (const b of doc.backups) {
    const actions = el("td", {});
    if (role >= ROLES.operator) {
      actions.append(el("button", { onclick: () => download(id, b.filename) }, "Download"),
                     " ",
                     el("button", { onclick: () => restore(id, b.filename) }, "Restore"));
    }
    if (role >= ROLES.admin) {
      actions.append(" ", el("button", { class: "danger",
                                         onclick: () => remove(id, b.filename) }, "Delete"));
    }
    body.append(el("tr", { "data-backup": b.filename },
      el("td", { class: "mono" }, b.filename),
      el("td", {}, b.kind === "safety_backup" ? "safety backup" : b.kind),
      el("td", {}, mib(b.size_bytes)),
      el("td", { title: b.created_at }, age(b.created_at)),
      el("td", {}, (b.stored_on || []).join(", ")),
      el("td", { class: "mono", title: b.sha256 }, (b.sha256 || "").slice(0, 12) + "…"),
      el("td", {}, b.verification ? b.verification.outcome : "—"),
      actions));
  }
}

// ------------------------------------------------------------------ actions
async function startJob(method, path, body) {
  try {
    const job = await api(method, path, body);
    for (const w of job.warnings || []) say(w, "error");
    await loadJobs();
    track(job.id);
    return job;
  } catch (e) {
    say(e.message, "error");
    return null;
  }
}

async function download(target, name) {
  const path = `/api/v1/targets/${encodeURIComponent(target)}/backups/` +
    `${encodeURIComponent(name)}/download`;
  try {
    const ticket = await api("POST", "/api/v1/tickets", { path });
    const link = el("a", { href: ticket.url, download: name });
    document.body.append(link);
    link.click();
    link.remove();
  } catch (e) {
    say(e.message, "error");
  }
}

async function restore(target, name) {
  const ok = await confirmAction(
    `Restore ${name} over the database of target "${target}"? A safety backup of the ` +
    "current database is taken first; the backup is verified before anything is dropped.");
  if (ok) await startJob("POST", `/api/v1/targets/${encodeURIComponent(target)}/restores`,
                         { backup: name });
}

async function remove(target, name) {
  const ok = await confirmAction(
    `Delete ${name} of target "${target}" from every destination that stores it?`);
  if (!ok) return;
  try {
    await api("DELETE", `/api/v1/targets/${encodeURIComponent(target)}/backups/` +
              encodeURIComponent(name));
    say(`deleted ${name}`, "ok");
    await Promise.all([selectTarget(target), loadTargets(), loadAudit()]);
  } catch (e) {
    say(e.message, "error");
  }
}

function upload(event) {
  event.preventDefault();
  const file = $("#upload-file").files[0];
  if (!file || !selected) return;
  const target = selected;
  const restoreAfter = $("#upload-restore").checked;
  const bar = $("#upload-progress");
  const go = (ok) => {
    if (!ok) return;
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/api/v1/targets/${encodeURIComponent(target)}/uploads` +
             (restoreAfter ? "?restore=true" : ""));
    xhr.setRequestHeader("Authorization", "Bearer " + token);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.setRequestHeader("X-Filename", file.name);
    bar.hidden = false;
    bar.value = 0;
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) bar.value = (100 * e.loaded) / e.total;
      say(`uploading ${mib(e.loaded)} of ${mib(e.total)}`);
    };
    xhr.onload = async () => {
      const doc = JSON.parse(xhr.responseText || "{}");
      if (xhr.status >= 400) {
        say(`${doc.error.code}: ${doc.error.message}`, "error");
        return;
      }
      bar.value = 100;
      const stored = doc.upload || doc;
      say(`uploaded ${stored.filename} (${mib(stored.size_bytes)})`, "ok");
      await selectTarget(target);
      if (doc.job) { await loadJobs(); track(doc.job.id); }
    };
    xhr.onerror = () => say("the upload failed (connection)", "error");
    xhr.send(file);
  };
  if (restoreAfter) {
    confirmAction(`Upload ${file.name} and restore it over the database of target ` +
                  `"${target}"? A safety backup is taken first.`).then(go);
  } else {
    go(true);
  }
}

// ------------------------------------------------------------------ jobs
function outcome(job) {
  if (job.status === "succeeded") {
    const r = job.result || {};
    if (job.kind === "restore") {
      return `Restored from ${(job.params || {}).backup || "the backup"}` +
        (r.safety_backup ? `; safety backup ${r.safety_backup}` : "") + ".";
    }
    if (r.filename) return `${r.filename} (${mib(r.size_bytes)})`;
    if (r.outcome) return `drill ${r.outcome}`;
    return "done";
  }
  if (job.status === "failed" || job.status === "cancelled") {
    const err = job.error || {};
    const state = {
      unchanged: "The database is unchanged.",
      rolled_back: "The database was rolled back to the safety backup.",
      restored: "The database was restored.",
      unknown: "The database's state is unknown: check it, or restore the safety backup.",
    }[err.database_state] || "";
    return `${err.code || job.status}: ${err.message || ""} ${state}`.trim();
  }
  return "";
}

function progressCell(p) {
  const cell = el("td", { class: "progress" });
  const bar = el("progress", { max: "100" });
  if (p && p.percent !== null && p.percent !== undefined) bar.value = p.percent;
  const text = !p ? "" : [p.phase, p.bytes_done ? mib(p.bytes_done) : null,
    p.rate_bps ? `${mib(p.rate_bps)}/s` : null,
    p.eta_s !== null && p.eta_s !== undefined ? `ETA ${Math.round(p.eta_s)} s` : null]
    .filter(Boolean).join(" · ");
  cell.append(bar, el("span", { class: "bar-text" }, text));
  return cell;
}

function jobRow(job) {
  return el("tr", { "data-job": job.id, "data-status": job.status },
    el("td", { class: "mono" }, job.id),
    el("td", {}, job.kind),
    el("td", {}, job.target),
    el("td", { class: "status" }, job.status),
    job.status === "succeeded" ? progressCell({ percent: 100, phase: "done" })
                               : progressCell(job.progress),
    el("td", { class: job.status === "failed" ? "error outcome" : "outcome" }, outcome(job)));
}

async function loadJobs() {
  const doc = await api("GET", "/api/v1/jobs?limit=20");
  const body = $("#jobs tbody");
  body.replaceChildren(...doc.jobs.filter((j) => j.kind !== "stats").map(jobRow));
  for (const job of doc.jobs) {
    if (!TERMINAL.includes(job.status)) track(job.id);
  }
}

async function track(jobId) {
  if (following.has(jobId)) return;
  following.add(jobId);
  try {
    await followEvents(jobId, (ev) => {
      const row = document.querySelector(`tr[data-job="${CSS.escape(jobId)}"]`);
      if (!row) return;
      if (ev.type === "progress" && ev.progress) {
        row.children[4].replaceWith(progressCell(ev.progress));
      } else if (ev.type === "phase") {
        row.querySelector(".status").textContent = `running: ${ev.phase || ""}`;
      }
    });
    const job = await api("GET", `/api/v1/jobs/${encodeURIComponent(jobId)}`);
    const row = document.querySelector(`tr[data-job="${CSS.escape(jobId)}"]`);
    if (row) row.replaceWith(jobRow(job));
    await Promise.all([loadTargets(), loadAudit()]);  // last backup, last drill, the trail
    if (selected) await selectTarget(selected);
  } finally {
    following.delete(jobId);
  }
}

async function followEvents(jobId, onEvent) {
  let last = null;
  for (let attempt = 0; attempt < 30; attempt++) {
    const headers = { Authorization: "Bearer " + token };
    if (last) headers["Last-Event-ID"] = last;
    let res;
    try {
      res = await fetch(`/api/v1/jobs/${encodeURIComponent(jobId)}/events`, { headers });
    } catch (e) {
      await new Promise((r) => setTimeout(r, 1000));
      continue;
    }
    if (!res.ok) return;
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let data = [];
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (e) {
        break;
      }
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, { stream: true });
      let i;
      while ((i = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, i).replace(/\r$/, "");
        buffer = buffer.slice(i + 1);
        if (line.startsWith("id:")) last = line.slice(3).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
        else if (line === "" && data.length) {
          const ev = JSON.parse(data.join("\n"));
          data = [];
          onEvent(ev);
          if (TERMINAL.includes(ev.type)) return;
        }
      }
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

// ------------------------------------------------------------------ audit
async function loadAudit() {
  if ($("#audit-view").hidden) return;
  const doc = await api("GET", "/api/v1/audit?limit=50");
  $("#audit tbody").replaceChildren(...doc.entries.map((e) => el("tr", {},
    el("td", {}, e.ts), el("td", {}, e.subject || ""), el("td", { title: e.client || "" }, e.via || e.client || ""),
    el("td", {}, e.action), el("td", {}, e.result), el("td", {}, e.target || ""),
    el("td", { class: "mono" }, e.backup || e.job || ""))));
}

// ------------------------------------------------------------------ SSO (PKCE)
function b64url(bytes) {
  return btoa(String.fromCharCode(...new Uint8Array(bytes)))
    .replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

async function startSso(oidc) {
  if (!window.crypto || !crypto.subtle) {
    $("#login-error").textContent = "single sign-on needs HTTPS (or localhost) in this browser";
    return;
  }
  const verifier = b64url(crypto.getRandomValues(new Uint8Array(32)));
  const state = b64url(crypto.getRandomValues(new Uint8Array(16)));
  const challenge = b64url(await crypto.subtle.digest("SHA-256",
                                                      new TextEncoder().encode(verifier)));
  sessionStorage.setItem("safehold-pkce", JSON.stringify({ verifier, state }));
  const url = new URL(oidc.authorization_endpoint);
  const params = { response_type: "code", client_id: oidc.client_id, scope: "openid",
    redirect_uri: location.origin + "/", state, code_challenge: challenge,
    code_challenge_method: "S256" };
  for (const [k, v] of Object.entries(params)) url.searchParams.set(k, v);
  location.assign(url.toString());
}

async function finishSso(query) {
  const saved = JSON.parse(sessionStorage.getItem("safehold-pkce") || "null");
  sessionStorage.removeItem("safehold-pkce");
  history.replaceState(null, "", "/");  // the code leaves the address bar at once
  if (!saved || query.get("state") !== saved.state) {
    $("#login-error").textContent = "the login came back with an unknown state: try again";
    return;
  }
  const res = await fetch("/api/v1/login/token", { method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ code: query.get("code"), code_verifier: saved.verifier,
                           redirect_uri: location.origin + "/" }) });
  const doc = await res.json().catch(() => ({}));
  if (!res.ok) {
    $("#login-error").textContent = `${doc.error.code}: ${doc.error.message}`;
    return;
  }
  await login(doc.access_token);
}

async function start() {
  const query = new URLSearchParams(location.search);
  if (query.get("error")) {
    history.replaceState(null, "", "/");
    $("#login-error").textContent = `the identity provider said: ${query.get("error")}`;
  } else if (query.get("code")) {
    await finishSso(query);
    return;
  }
  if (token) {
    await login(token);
    return;
  }
  const config = await fetch("/api/v1/login-config").then((r) => r.json()).catch(() => ({}));
  if (config.oidc) {
    $("#sso").hidden = false;
    $("#sso-issuer").textContent = config.oidc.issuer;
    $("#sso-login").addEventListener("click", () => startSso(config.oidc));
  }
}

// ------------------------------------------------------------------ wiring
$("#login-form").addEventListener("submit", (e) => { e.preventDefault(); login($("#token").value); });
$("#logout").addEventListener("click", logout);
$("#upload-form").addEventListener("submit", upload);
$("#backup-now").addEventListener("click", () =>
  startJob("POST", `/api/v1/targets/${encodeURIComponent(selected)}/backups`, {}));
$("#verify-now").addEventListener("click", () =>
  startJob("POST", `/api/v1/targets/${encodeURIComponent(selected)}/verify`, {}));
start();
