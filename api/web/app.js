// Safehold's web page: plain JavaScript, no build step. Every value from the API is put
// in the page as text (never as HTML). The token lives in sessionStorage (this tab only)
// and goes out as an Authorization header; live progress is read from the job's SSE
// stream with fetch (EventSource cannot send headers); downloads use one-use tickets.
"use strict";

const ROLES = { viewer: 1, operator: 2, admin: 3 };
const TERMINAL = ["succeeded", "failed", "cancelled"];
let token = sessionStorage.getItem("safehold-token") || "";
let me = null;
let bySchedule = {};
let selected = null;
let targetsById = {};
let pitrWindow = null;  // the selected target's recovery window, when it has PITR
const following = new Set();
// paging: the cursor of the page shown (null: the newest), and the next one's
const pages = { jobs: { before: null, next: null, trail: [] },
                audit: { before: null, next: null, trail: [] } };

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

function confirmAction(text, where = false) {
  const dialog = $("#confirm");
  if (text !== null) $("#confirm-text").textContent = text;  // null: already written
  $("#restore-where").hidden = !where;
  if (!where) $("#restore-what").hidden = true;
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
  bySchedule = Object.fromEntries(schedules.schedules.map((s) => [s.target, s]));
  targetsById = Object.fromEntries(targets.targets.map((t) => [t.id, t]));
  fillTargetFilters(targets.targets.map((t) => t.id));
  const body = $("#targets tbody");
  body.replaceChildren();
  for (const t of targets.targets) {
    const s = bySchedule[t.id] || {};
    const row = el("tr", { "data-target": t.id, tabindex: "0",
                           class: t.id === selected ? "selected" : null },
      el("td", {}, el("a", { href: "#" }, t.id)),
      el("td", { class: "wide" }, t.engine),
      el("td", { class: "wide" }, t.schedule ? `${t.schedule} (${until(s.next_run)})` : "—"),
      el("td", { class: "last-backup" }, "…"),
      el("td", { class: "last-drill" }, "…"),
      el("td", { class: "health" }, "…"));
    // the whole row selects the target (mouse, or Enter/Space from the keyboard)
    row.addEventListener("click", (e) => { e.preventDefault(); selectTarget(t.id); });
    row.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); selectTarget(t.id); }
    });
    body.append(row);
    api("GET", `/api/v1/targets/${encodeURIComponent(t.id)}/backups`).then((doc) => {
      const newest = doc.backups.find((b) => b.kind === "backup");
      row.querySelector(".last-backup").textContent =
        newest ? `${age(newest.created_at)} (${mib(newest.size_bytes)})` : "none yet";
      const drilled = doc.backups.find((b) => b.verification);
      row.querySelector(".last-drill").textContent = drilled
        ? `${drillWord(drilled.verification)} ${age(drilled.verified_at)}` : "none";
      // health in words: what an operator must act on first
      const health = row.querySelector(".health");
      const problems = [];
      if (s.missed_since) problems.push(`scheduled backups missed (alert ${age(s.missed_since)})`);
      if (s.last_status === "failed") problems.push(`last scheduled backup failed (${s.last_error})`);
      if (drilled && drilled.verification.outcome === "failed") problems.push("last drill failed");
      if (drilled && drilled.verification.outcome === "not_run") {
        problems.push(`last drill could not run (${drilled.verification.error})`);
      }
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
  const path = `/api/v1/targets/${encodeURIComponent(id)}`;
  const [doc, plan] = await Promise.all([api("GET", `${path}/backups`),
                                         api("GET", `${path}/retention`).catch(() => null)]);
  if (selected !== id) return;  // another target was chosen meanwhile
  showFacts(id, plan);
  await showPitr(id);
  const regular = doc.backups.filter((b) => b.kind === "backup");
  drawChart($("#chart-size"), regular, (b) => b.size_bytes, mib);
  drawChart($("#chart-duration"), regular, (b) => b.duration_s,
            (v) => (v === null || v === undefined ? "?" : `${v.toFixed(1)} s`));
  const showSafety = $("#show-safety").checked;
  const safety = doc.backups.filter((b) => b.kind === "safety_backup").length;
  $("#safety-count").textContent = safety ? `(${safety})` : "";
  const body = $("#backups tbody");
  body.replaceChildren();
  for (const b of doc.backups) {
    if (b.kind === "safety_backup" && !showSafety) continue;
    const actions = el("td", { class: "row-actions" });
    if (role >= ROLES.operator) {
      actions.append(el("button", { onclick: () => download(id, b.filename) }, "Download"),
                     " ",
                     el("button", { onclick: () => restore(id, b.filename) }, "Restore"));
    }
    if (role >= ROLES.admin) {
      const more = el("details", { class: "more" }, el("summary", { title: "more" }, "⋯"),
        el("div", { class: "menu" },
           el("button", { class: "danger", onclick: () => remove(id, b.filename) },
              "Delete…")));
      actions.append(" ", more);
    }
    const drill = b.verification;
    body.append(el("tr", { "data-backup": b.filename },
      el("td", { class: "mono" }, b.filename),
      el("td", {}, b.kind === "safety_backup" ? "safety backup" : b.kind),
      el("td", {}, mib(b.size_bytes)),
      el("td", { title: b.created_at }, age(b.created_at)),
      el("td", { class: "wide" }, (b.stored_on || []).join(", ")),
      el("td", { class: "mono wide", title: b.sha256 }, (b.sha256 || "").slice(0, 12) + "…"),
      el("td", { class: drill ? { passed: "ok", failed: "error", not_run: "warn" }[
                   drill.outcome] || "" : "",
                 title: drill && drill.why ? drill.why : null },
         drill ? drillWord(drill) : "—"),
      actions));
  }
  labelCells($("#backups"));
}

// each cell names its column (shown before the value when a narrow screen stacks a row)
function labelCells(table) {
  const heads = [...table.querySelectorAll("thead th")].map((th) => th.textContent.trim());
  for (const row of table.querySelectorAll("tbody tr")) {
    [...row.children].forEach((td, i) => {
      if (heads[i] && td.colSpan === 1) td.setAttribute("data-label", heads[i]);
    });
  }
}

function drillWord(v) {
  return v.outcome === "not_run" ? `not run: ${v.error}` : v.outcome;
}

function until(iso) {
  if (!iso) return "not scheduled";
  const s = (Date.parse(iso) - Date.now()) / 1000;
  if (s < 90) return "next in a minute";
  if (s < 5400) return `next in ${Math.round(s / 60)} min`;
  if (s < 129600) return `next in ${Math.round(s / 3600)} h`;
  return `next in ${Math.round(s / 86400)} days`;
}

function policyText(p) {
  const parts = Object.entries(p || {}).map(([k, v]) => `${k.replace("_", " ")} ${v}`);
  return parts.length ? parts.join(", ") : "none: every backup is kept";
}

function showFacts(id, plan) {
  const s = bySchedule[id] || {};
  const facts = $("#target-facts");
  const item = (term, ...value) => [el("dt", {}, term), el("dd", {}, ...value)];
  const rows = [
    ...item("Next backup", s.schedule ? `${until(s.next_run)} (${s.schedule}, ${s.timezone})`
                                      : "no schedule: back up by hand"),
    ...item("Retention", policyText(s.retention)),
  ];
  if (plan) {
    const doomed = [];
    for (const [dest, d] of Object.entries(plan.destinations)) {
      for (const x of d.delete || []) doomed.push([dest, x]);
    }
    const list = el("ul", {}, ...doomed.slice(0, 5).map(([dest, x]) =>
      el("li", {}, el("span", { class: "mono" }, x.filename), ` on ${dest} — `,
         x.reasons.join("; "))));
    rows.push(...item("Next prune deletes",
      doomed.length ? `${doomed.length} backup(s)` : "nothing",
      doomed.length > 5 ? ` (first 5 shown)` : "", doomed.length ? list : null));
  }
  facts.replaceChildren(...rows);
}

// ------------------------------------------------------------------ PITR timeline
async function showPitr(id) {
  const t = targetsById[id];
  const view = $("#pitr-view");
  if (!t || !t.pitr || !t.pitr.enabled) {
    view.hidden = true;
    pitrWindow = null;
    return;
  }
  view.hidden = false;
  let w;
  try {
    w = await api("GET", `/api/v1/targets/${encodeURIComponent(id)}/recovery-window`);
  } catch (e) {
    $("#pitr-summary").textContent = `the recovery window cannot be read: ${e.message}`;
    return;
  }
  if (selected !== id) return;
  pitrWindow = w;
  const s = w.streaming || {};
  const parts = [w.earliest ? `Recoverable from ${w.earliest} to ${w.latest}` :
                 "Not recoverable yet: " + (w.latest ? "no base backup opens the window"
                                                      : "nothing archived")];
  if (w.lag_s !== null && w.lag_s !== undefined) parts.push(`${w.lag_s.toFixed(1)} s behind`);
  if (s.error) parts.push(`streamer: ${s.error}`);
  // (a continuous one is a GTID course change: the binlog goes on there)
  const holes = w.gaps.filter((g) => !g.continuous);
  if (holes.length) parts.push(`${holes.length} gap(s)`);
  if (holes.length < w.gaps.length) {
    parts.push(`${w.gaps.length - holes.length} GTID change(s): ` +
               w.gaps.filter((g) => g.continuous).map((g) => g.why).join("; "));
  }
  const summary = $("#pitr-summary");
  summary.textContent = parts.join(" · ");
  summary.className = s.error || holes.length ? "error" : "";
  drawTimeline($("#pitr-timeline"), w, $("#pitr-at").value);
}

function instants(w) {
  const all = [w.earliest, w.latest, ...w.bases.map((b) => b.consistent_at),
               ...w.gaps.map((g) => g.after)].filter(Boolean).map(Date.parse);
  if (!all.length) return null;
  const t0 = Math.min(...all), t1 = Math.max(...all);
  return [t0, t1 > t0 ? t1 : t0 + 1000];
}

// bases (blue ticks; grey: not usable), archived WAL (green), gaps (red), each base's
// last drill (a dot: green passed, red failed) and the picked instant (dashed)
function drawTimeline(svg, w, picked) {
  const NS = "http://www.w3.org/2000/svg";
  const node = (tag, attrs, title) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (title) {
      const tt = document.createElementNS(NS, "title");
      tt.textContent = title;
      n.append(tt);
    }
    return n;
  };
  const W = 640, L = 6, R = 634, Y = 30;
  const span = instants(w);
  const children = [node("line", { class: "axis", x1: L, y1: Y + 12, x2: R, y2: Y + 12 })];
  if (!span) {
    const text = node("text", { x: W / 2, y: Y, "text-anchor": "middle" });
    text.textContent = "nothing archived yet";
    svg.replaceChildren(text);
    return;
  }
  const x = (iso) => L + ((Date.parse(iso) - span[0]) / (span[1] - span[0])) * (R - L);
  if (w.earliest && w.latest) {
    children.push(node("rect", { class: "wal", x: x(w.earliest), y: Y,
                                 width: Math.max(2, x(w.latest) - x(w.earliest)), height: 12 },
                       `${w.engine === "mysql" ? "binlog" : "WAL"} archived: recoverable ` +
                       `from ${w.earliest} to ${w.latest}`));
  }
  for (const g of w.gaps) {
    if (!g.after) continue;
    children.push(node("rect", { class: "gap", x: x(g.after) - 2, y: Y - 4, width: 4,
                                 height: 20 }, `gap after ${g.after}: ${g.why}`));
  }
  for (const b of w.bases) {
    const bx = x(b.consistent_at);
    children.push(node("line", { class: "base" + (b.usable ? "" : " unusable"), x1: bx,
                                 y1: Y - 10, x2: bx, y2: Y + 16 },
                       `base ${b.filename}, consistent at ${b.consistent_at}, ` +
                       `${mib(b.size_bytes)}${b.usable ? "" : " (not usable)"}`));
    const d = b.last_drill;
    if (d) {
      children.push(node("circle", { class: `drill-${d.outcome === "passed" ? "passed"
                                                                             : "failed"}`,
                                     cx: bx, cy: Y - 14, r: 4 },
                         `drill to ${d.point_in_time}: ${d.outcome}` +
                         (d.rto_s !== undefined ? `, RTO ${d.rto_s} s` : "") +
                         (d.error ? ` (${d.error})` : "")));
    }
  }
  if (picked && !Number.isNaN(Date.parse(picked))) {
    const px = Math.min(R, Math.max(L, x(picked)));
    children.push(node("line", { class: "pick", x1: px, y1: 4, x2: px, y2: Y + 24 },
                       `restore to ${picked}`));
  }
  const label = (ms, anchor, at) => {
    const n = node("text", { x: at, y: 70, "text-anchor": anchor });
    n.textContent = new Date(ms).toISOString().replace("T", " ").slice(0, 19) + "Z";
    return n;
  };
  children.push(label(span[0], "start", L), label(span[1], "end", R));
  svg.replaceChildren(...children);
}

// a click on the timeline picks that instant (kept inside the window)
function pickInstant(event) {
  const w = pitrWindow;
  const span = w && instants(w);
  if (!span || !w.earliest) return;
  const box = event.currentTarget.getBoundingClientRect();
  const frac = (event.clientX - box.left) / box.width;
  const L = 6 / 640, R = 634 / 640;
  let ms = span[0] + ((frac - L) / (R - L)) * (span[1] - span[0]);
  ms = Math.min(Date.parse(w.latest), Math.max(Date.parse(w.earliest), ms));
  $("#pitr-at").value = new Date(ms).toISOString();
  drawTimeline($("#pitr-timeline"), w, $("#pitr-at").value);
}

async function restoreToInstant(event) {
  event.preventDefault();
  const at = $("#pitr-at").value.trim();
  if (!at) {
    say("pick an instant on the timeline, or type one (UTC, e.g. 2026-12-07T10:14:59Z)",
        "error");
    return;
  }
  const ok = await confirmAction(
    `Restore the database of target "${selected}" to its state at ${at}? It is recovered ` +
    "from the archive in a scratch server first; a safety backup of the current database " +
    "is taken before anything is replaced.");
  if (ok) await startJob("POST", `/api/v1/targets/${encodeURIComponent(selected)}/restores`,
                         { point_in_time: at });
}

// a small SVG chart, oldest → newest: one bar per backup, its value on hover
function drawChart(svg, backups, value, label) {
  const NS = "http://www.w3.org/2000/svg";
  const node = (tag, attrs, text) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    return n;
  };
  const points = backups.slice(0, 30).reverse()
    .map((b) => ({ b, v: value(b) })).filter((p) => typeof p.v === "number");
  const W = 320, H = 120, left = 4, bottom = 16, top = 14;
  const children = [node("line", { class: "axis", x1: left, y1: H - bottom, x2: W,
                                   y2: H - bottom })];
  if (!points.length) {
    children.push(node("text", { x: W / 2, y: H / 2, "text-anchor": "middle" },
                       "no backups yet"));
    svg.replaceChildren(...children);
    return;
  }
  const max = Math.max(...points.map((p) => p.v)) || 1;
  const step = (W - left) / points.length;
  points.forEach((p, i) => {
    const h = Math.max(1, ((H - bottom - top) * p.v) / max);
    const bar = node("rect", { class: "bar", x: left + i * step + step * 0.15,
                               y: H - bottom - h, width: Math.max(1, step * 0.7), height: h });
    bar.append(node("title", {}, `${p.b.filename}: ${label(p.v)}`));
    children.push(bar);
  });
  children.push(node("text", { x: left + 2, y: 10 }, `max ${label(max)}`),
                node("text", { x: left, y: H - 3 }, age(points[0].b.created_at)),
                node("text", { x: W - 2, y: H - 3, "text-anchor": "end" },
                     `${label(points[points.length - 1].v)} (latest)`));
  svg.replaceChildren(...children);
}

function fillTargetFilters(ids) {
  for (const sel of [$("#job-target"), $("#audit-target")]) {
    if (sel.options.length > 1) continue;
    for (const id of ids) sel.append(el("option", { value: id }, id));
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

// the restore dialog's choices as a request body, and its plan in words as they change
function restorePlan(target, name) {
  const t = targetsById[target];
  const where = document.querySelector("input[name=where]:checked").value;
  const into = $("#beside-name").value.trim();
  const other = $("#other-target").value;
  const some = document.querySelector("input[name=what]:checked").value === "tables";
  const tables = some ? [...document.querySelectorAll("#table-choices input:checked")]
    .map((c) => c.value) : [];
  const what = some ? `table(s) ${tables.join(", ") || "…"} of ${name} (every other table ` +
    "is left as it is)" : name;
  const body = { backup: name };
  if (some) body.tables = tables;
  let text;
  if (where === "beside") {
    body.into_database = into;
    const over = $("#beside-replace").checked;
    if (over) body.replace = true;
    const named = t && t.engine === "redis" ? `database index ${into || "…"}` :
      `a new database "${into || "…"}"`;
    text = `Restore ${what} into ${named} beside the database of target "${target}", ` +
      "which is not touched. " + (over ? "If that database exists it is restored over, " +
      "its safety backup first; " : "It is refused if that database exists; ") +
      "the backup is verified first.";
  } else if (where === "target") {
    body.into_target = other;
    text = `Restore ${what} over the database of target "${other}" (a copy of target ` +
      `"${target}"'s backup; "${target}" is not touched)? A safety backup of "${other}" is ` +
      "taken first; the backup is verified before anything is dropped.";
  } else {
    text = `Restore ${what} over the database of target "${target}"? A safety backup of ` +
      (some ? "those tables" : "the current database") + " is taken first; the backup is " +
      "verified before anything is dropped.";
  }
  $("#confirm-text").textContent = text;
  return body;
}

// the tables a backup holds, as checkboxes (from its manifest: nothing is read)
async function tableChoices(target, name) {
  const box = $("#table-choices");
  box.replaceChildren();
  try {
    const inside = await api("GET", `/api/v1/targets/${encodeURIComponent(target)}/backups/` +
                             `${encodeURIComponent(name)}/contents`);
    for (const item of inside.items || []) {
      const check = el("input", { type: "checkbox", value: item.name });
      box.append(el("label", {}, check, ` ${item.name}`), el("br"));
    }
  } catch (e) { /* no list: the whole database only */ }
  return box.childElementCount > 0;
}

async function restore(target, name) {
  const t = targetsById[target];
  const canBeside = t && ["postgresql", "mysql", "sqlite", "mongodb", "redis"].includes(
    t.engine) &&
    !t.databases;
  const others = Object.values(targetsById).filter(
    (o) => t && o.id !== target && o.engine === t.engine && !o.databases);
  $("#other-target").replaceChildren(...others.map((o) => el("option", { value: o.id }, o.id)));
  $("#where-target-row").hidden = others.length === 0;
  $("#where-beside-row").hidden = !canBeside;
  document.querySelector("input[name=where][value=replace]").checked = true;
  document.querySelector("input[name=what][value=all]").checked = true;
  $("#beside-name").value = "";
  $("#beside-replace").checked = false;
  $("#table-choices").replaceChildren();
  restorePlan(target, name);  // at once: the choices below come from the server
  const canTables = t && !t.databases &&
    ["postgresql", "sqlite", "mysql", "mongodb"].includes(t.engine) &&
    await tableChoices(target, name);
  const update = () => restorePlan(target, name);
  const fields = [...document.querySelectorAll("input[name=where], input[name=what]"),
                  $("#beside-name"), $("#beside-replace"), $("#other-target"),
                  $("#table-choices")];
  for (const f of fields) f.addEventListener("input", update);
  update();
  const shown = confirmAction(null, canBeside || others.length > 0);
  $("#restore-what").hidden = !canTables;
  const ok = await shown;
  const body = restorePlan(target, name);
  for (const f of fields) f.removeEventListener("input", update);
  if (!ok) return;
  if (body.into_database === "") { say("name the new database", "error"); return; }
  if (body.tables && !body.tables.length) { say("choose the tables", "error"); return; }
  await startJob("POST", `/api/v1/targets/${encodeURIComponent(target)}/restores`, body);
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

const JOBS_PAGE = 20;
const AUDIT_PAGE = 25;

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v) q.set(k, v);
  return q.toString();
}

async function loadJobs() {
  const page = pages.jobs;
  const doc = await api("GET", "/api/v1/jobs?" + query({
    limit: JOBS_PAGE, target: $("#job-target").value, kind: $("#job-kind").value,
    status: $("#job-status").value, before: page.before }));
  page.next = doc.next_before || null;
  const body = $("#jobs tbody");
  body.replaceChildren(...doc.jobs.filter((j) => j.kind !== "stats").map(jobRow));
  if (!doc.jobs.length) body.append(el("tr", {}, el("td", { colspan: "6", class: "muted" },
                                                      "no job matches")));
  labelCells($("#jobs"));
  showPager("jobs", doc.jobs.length);
  for (const job of doc.jobs) {
    if (!TERMINAL.includes(job.status)) track(job.id);
  }
}

function showPager(name, shown) {
  const page = pages[name];
  $(`#${name}-older`).disabled = !page.next;
  $(`#${name}-newest`).disabled = page.before === null;
  $(`#${name}-page`).textContent = `page ${page.trail.length + 1}` +
    (shown ? ` · ${shown} shown` : "");
}

function pageTo(name, load, direction) {
  const page = pages[name];
  if (direction === "older" && page.next) {
    page.trail.push(page.before);
    page.before = page.next;
  } else {
    page.before = null;
    page.trail = [];
  }
  return load();
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
    if (row) { row.replaceWith(jobRow(job)); labelCells($("#jobs")); }
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
  const page = pages.audit;
  const doc = await api("GET", "/api/v1/audit?" + query({
    limit: AUDIT_PAGE, target: $("#audit-target").value, result: $("#audit-result").value,
    via: $("#audit-via").value, action: $("#audit-action").value.trim(),
    before: page.before }));
  page.next = doc.next_before || null;
  $("#audit tbody").replaceChildren(...doc.entries.map((e) => el("tr", {},
    el("td", { title: e.ts }, age(e.ts)), el("td", {}, e.subject || ""),
    el("td", { title: e.client ? `token client: ${e.client}` : null }, e.via || e.client || ""),
    el("td", {}, e.action),
    el("td", { class: { denied: "error", error: "error", failed: "error" }[e.result] || "" },
       e.result),
    el("td", {}, e.target || ""),
    el("td", { class: "mono wide" }, e.backup || e.job || ""))));
  if (!doc.entries.length) {
    $("#audit tbody").append(el("tr", {}, el("td", { colspan: "7", class: "muted" },
                                              "no entry matches")));
  }
  labelCells($("#audit"));
  showPager("audit", doc.entries.length);
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
$("#show-safety").addEventListener("change", () => selected && selectTarget(selected));
$("#pitr-timeline").addEventListener("click", pickInstant);
$("#pitr-form").addEventListener("submit", restoreToInstant);
$("#pitr-at").addEventListener("change", () =>
  pitrWindow && drawTimeline($("#pitr-timeline"), pitrWindow, $("#pitr-at").value));
$("#pitr-drill").addEventListener("click", () =>
  startJob("POST", `/api/v1/targets/${encodeURIComponent(selected)}/verify`,
           { point_in_time: "random" }));
for (const [name, load] of [["jobs", loadJobs], ["audit", loadAudit]]) {
  $(`#${name}-older`).addEventListener("click", () => pageTo(name, load, "older"));
  $(`#${name}-newest`).addEventListener("click", () => pageTo(name, load, "newest"));
  const filters = $(name === "jobs" ? "#job-filters" : "#audit-filters");
  filters.addEventListener("change", () => pageTo(name, load, "newest"));
  filters.addEventListener("submit", (e) => { e.preventDefault(); pageTo(name, load, "newest"); });
}
start();
