// The /ui page: only the public HTTP API (POST /tasks, POST /predict_tasks, POST /predict).
"use strict";

const $ = (id) => document.getElementById(id);
let TASKS = {};   // POST /tasks
let IMAGE = null; // the File to send

const fmt = (n) => n == null ? "?" : n >= 1e6 ? (n / 1e6).toFixed(2) + " M" : n >= 1e3 ? (n / 1e3).toFixed(1) + " k" : String(n);
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

async function loadTasks() {
  const r = await fetch("/tasks", { method: "POST" });
  if (!r.ok) throw new Error("POST /tasks: " + r.status);
  TASKS = await r.json();
  const ids = Object.keys(TASKS);
  const versions = [...new Set(ids.map((t) => TASKS[t].version))];
  $("summary").textContent = `${ids.length} tasks` + (versions[0] != null ? `, version ${versions.join(", ")}` : "");
  $("tasks").innerHTML = ids.map((t) =>
    `<label><input type="checkbox" class="task-box" value="${esc(t)}" checked> ${esc(t)} <span class="meta">(${TASKS[t].num_labels} labels, v${TASKS[t].version ?? "-"})</span></label>`).join("");
  document.querySelectorAll(".task-box").forEach((b) => b.addEventListener("change", () => {
    $("all").checked = [...document.querySelectorAll(".task-box")].every((x) => x.checked);
  }));
  drawGraph();
}

function chosen() {
  return [...document.querySelectorAll(".task-box")].filter((b) => b.checked).map((b) => b.value);
}

function setImage(file) {
  if (!file) return;
  IMAGE = file;
  const img = $("preview");
  img.src = URL.createObjectURL(file);
  img.style.display = "block";
  $("run").disabled = false;
}

async function post(path, fields) {
  const form = new FormData();
  for (const [k, v] of Object.entries(fields)) form.append(k, v);
  const t0 = performance.now();
  const r = await fetch(path, { method: "POST", body: form });
  const ms = performance.now() - t0;
  const body = await r.json().catch(() => ({ error: r.statusText }));  // an error: {"error": message}
  if (!r.ok) throw new Error(`${path}: ${r.status} ${body.error || JSON.stringify(body)}`);
  return [body, ms];
}

async function classify() {
  const tasks = chosen();
  $("status").textContent = "";
  if (!IMAGE || !tasks.length) { $("status").textContent = "pick an image and at least one task"; return; }
  $("run").disabled = true;
  try {
    // all the tasks together: one request, shared segments run once
    const [answer, together] = await post("/predict_tasks", { image: IMAGE, tasks: JSON.stringify(tasks) });
    $("together").textContent = `(${tasks.length} tasks in one /predict_tasks request: ${together.toFixed(1)} ms)`;
    // each task alone, for its own latency
    const alone = {};
    for (const t of tasks) alone[t] = (await post("/predict", { task: t, image: IMAGE }))[1];
    show(answer.predictions, alone);
  } catch (e) {
    $("status").textContent = String(e.message || e);
  } finally {
    $("run").disabled = false;
  }
}

function show(predictions, alone) {
  $("results").innerHTML = predictions.map((p) => {
    const rec = TASKS[p.task] || {};
    const shared = rec.shared_params ?? 0;
    const rows = Object.entries(p.scores).map(([label, s], i) =>
      `<div class="row${i === 0 ? " top" : ""}"><span class="label">${esc(label)}</span><div class="bar"><div style="width:${(100 * s).toFixed(1)}%"></div></div><span class="score">${s.toFixed(3)}</span></div>`).join("");
    return `<div class="task" data-task="${esc(p.task)}"><h3>${esc(p.task)}: <span class="answer">${esc(p.label)}</span></h3>
      <div class="meta">parameters ${fmt(rec.params)}: own ${fmt(rec.params - shared)}, shared ${fmt(shared)} (accounted ${fmt(Math.round(rec.accounted_params))});
      latency alone <span class="latency">${alone[p.task].toFixed(1)}</span> ms; version ${rec.version ?? "-"}</div>${rows}</div>`;
  }).join("");
}

function drawGraph() {
  // layers: a segment's column is its position in the longest chain reaching it
  const col = {}, users = {};
  for (const [t, rec] of Object.entries(TASKS)) {
    rec.segments.forEach((s, i) => { col[s] = Math.max(col[s] ?? 0, i); (users[s] = users[s] || new Set()).add(t); });
  }
  const depth = Math.max(0, ...Object.values(col)) + 1;
  const columns = [...Array(depth + 1)].map(() => []);
  Object.keys(col).sort().forEach((s) => columns[col[s]].push(s));
  const tasks = Object.keys(TASKS);
  columns[depth] = tasks.map((t) => "task:" + t);
  const W = 130, H = 44, X = (c) => 20 + c * W, rows = Math.max(...columns.map((c) => c.length));
  const pos = {};
  columns.forEach((c, ci) => c.forEach((n, ri) => { pos[n] = [X(ci), 20 + (ri + (rows - c.length) / 2) * H]; }));
  let edges = "", nodes = "";
  for (const [t, rec] of Object.entries(TASKS)) {
    const chain = [...rec.segments, "task:" + t];
    for (let i = 1; i < chain.length; i++) {
      const [x1, y1] = pos[chain[i - 1]], [x2, y2] = pos[chain[i]];
      edges += `<line x1="${x1 + 80}" y1="${y1 + 14}" x2="${x2}" y2="${y2 + 14}" stroke="#999"/>`;
    }
  }
  for (const [n, [x, y]] of Object.entries(pos)) {
    const isTask = n.startsWith("task:"), shared = !isTask && users[n].size > 1;
    const fill = isTask ? "#f3e9d2" : shared ? "#cfe0ff" : "#eee";
    const tip = isTask ? n.slice(5) : `${n}: ${[...users[n]].join(", ")}`;
    nodes += `<g class="${isTask ? "task-node" : "segment"}"><title>${esc(tip)}</title><rect x="${x}" y="${y}" width="80" height="28" rx="5" fill="${fill}" stroke="#678"/>` +
      `<text x="${x + 40}" y="${y + 18}" text-anchor="middle" font-size="12">${esc(isTask ? n.slice(5) : n)}</text></g>`;
  }
  $("graph").innerHTML = `<svg viewBox="0 0 ${X(depth) + 100} ${rows * H + 20}" xmlns="http://www.w3.org/2000/svg">${edges}${nodes}</svg>`;
}

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); setImage(e.dataTransfer.files[0]); });
$("file").addEventListener("change", (e) => setImage(e.target.files[0]));
$("all").addEventListener("change", (e) => document.querySelectorAll(".task-box").forEach((b) => { b.checked = e.target.checked; }));
$("run").addEventListener("click", classify);
loadTasks().catch((e) => { $("status").textContent = String(e.message || e); });
