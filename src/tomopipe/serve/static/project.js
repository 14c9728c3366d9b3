// The project page: runs as a graph (columns by depth along the provenance), status colours,
// a run's details, log (live while it runs), links to the viewers of its outputs, re-run.
"use strict";
tp.header("workflow");
let selected = null, lastRuns = [];

function layout(runs, edges) {
  const depth = {}, parents = {};
  for (const [a, b] of edges) (parents[b] = parents[b] || []).push(a);
  for (const run of runs) depth[run.id] = Math.max(0, ...(parents[run.id] || []).map(p => (depth[p] ?? 0) + 1));
  const rows = {}, pos = {};
  for (const run of runs) { const d = depth[run.id]; rows[d] = (rows[d] || 0) + 1; pos[run.id] = [d, rows[d] - 1]; }
  return pos;
}

function drawGraph(data) {
  const svg = document.getElementById("graph"), W = 150, H = 52, GX = 40, GY = 14;
  const nodes = data.runs.map(r => ({ ...r }));
  for (const job of data.jobs.filter(j => j.status === "queued"))
    nodes.push({ id: `job${job.id}`, name: job.label, step_type: job.step_type, status: "queued", inputs: [], outputs: [] });
  const pos = layout(nodes, data.edges);
  const columns = Math.max(1, ...Object.values(pos).map(p => p[0] + 1)), rows = Math.max(1, ...Object.values(pos).map(p => p[1] + 1));
  svg.setAttribute("width", Math.max(760, columns * (W + GX) + 20)); svg.setAttribute("height", rows * (H + GY) + 20);
  svg.replaceChildren();
  const at = id => [10 + pos[id][0] * (W + GX), 10 + pos[id][1] * (H + GY)];
  for (const [a, b] of data.edges) {
    if (!(a in pos) || !(b in pos)) continue;
    const [x1, y1] = at(a), [x2, y2] = at(b);
    svg.append(tp.svg("path", { d: `M${x1 + W},${y1 + H / 2} C${x1 + W + GX / 2},${y1 + H / 2} ${x2 - GX / 2},${y2 + H / 2} ${x2},${y2 + H / 2}`,
      fill: "none", stroke: "#7a869a" }));
  }
  for (const run of nodes) {
    const [x, y] = at(run.id), g = tp.svg("g", { "data-run": run.id, class: "run-node", style: "cursor:pointer" });
    g.append(tp.svg("rect", { x, y, width: W, height: H, rx: 6, class: `status-${run.status}`,
      stroke: run.id === selected ? "#000" : "#8893a5", "stroke-width": run.id === selected ? 2 : 1 }));
    const label = typeof run.id === "number" ? `${run.id} · ${run.name}` : run.name;
    g.append(Object.assign(tp.svg("text", { x: x + 6, y: y + 16, "font-weight": "bold" }), { textContent: label.slice(0, 22) }));
    g.append(Object.assign(tp.svg("text", { x: x + 6, y: y + 31 }), { textContent: run.step_type.slice(0, 22) }));
    const time = run.elapsed_s != null ? ` · ${tp.fmt(run.elapsed_s)} s` : "";
    g.append(Object.assign(tp.svg("text", { x: x + 6, y: y + 46, class: "run-status" }), { textContent: run.status + time }));
    if (typeof run.id === "number") g.addEventListener("click", () => { selected = run.id; refresh(); });
    svg.append(g);
  }
  const jobs = document.getElementById("jobs");
  jobs.replaceChildren(...data.jobs.slice(-5).map(j => tp.el("div", { class: "job", text:
    `job ${j.id}: ${j.label} — ${j.status}${j.run_id ? " (run " + j.run_id + ")" : ""}${j.message ? ": " + j.message : ""}` })));
}

async function showDetail(runId) {
  const run = await tp.get(`/api/runs/${runId}`), log = await (await fetch(`/api/runs/${runId}/log?tail_bytes=8000`)).text();
  const panel = document.getElementById("detail");
  const outputs = tp.el("ul");
  for (const o of run.outputs) {
    const url = tp.viewerUrl(o.kind, o.set_id), item = tp.el("li", { text: `${o.name}: ${o.kind}, ${o.n_items} items (set ${o.set_id}) ` });
    if (url) item.append(tp.el("a", { href: url, text: "view", class: "view-link" }));
    outputs.append(item);
  }
  const params = tp.el("table", { class: "data" });
  for (const [k, v] of Object.entries(run.params)) params.append(tp.el("tr", {}, tp.el("th", { text: k }), tp.el("td", { text: JSON.stringify(v) })));
  const rerun = tp.el("button", { id: "rerun", text: run.status === "finished" ? "re-run" : "continue (run again)", onclick: async () => {
    try { const r = await tp.post(`/api/runs/${runId}/rerun`, {}); message.textContent = `queued as job ${r.job.id}`; }
    catch (e) { message.textContent = e.message; } } });
  const edit = tp.el("a", { href: `/static/run.html?from=${runId}`, text: "re-run with changes" });
  const message = tp.el("span", { class: "ok" });
  panel.replaceChildren(tp.el("h3", { text: `run ${run.id}: ${run.name} (${run.step_type})` }),
    tp.el("div", { text: `status ${run.status}${run.elapsed_s != null ? ", " + tp.fmt(run.elapsed_s) + " s" : ""}` }),
    run.error ? tp.el("div", { class: "error", text: run.error }) : "",
    tp.el("div", { class: "row" }, rerun, edit, message), tp.el("b", { text: "outputs" }), outputs,
    tp.el("details", {}, tp.el("summary", { text: "parameters" }), params),
    tp.el("b", { text: "log" }), tp.el("pre", { class: "log", id: "log", text: log || "(empty)" }));
  const pre = document.getElementById("log"); pre.scrollTop = pre.scrollHeight;
}

async function refresh() {
  try {
    const data = await tp.get("/api/project");
    document.getElementById("title").textContent = `project ${data.project}: ${data.runs.length} runs`;
    drawGraph(data);
    const runningBefore = lastRuns.find(r => r.id === selected)?.status;
    lastRuns = data.runs;
    const now = data.runs.find(r => r.id === selected);
    if (selected !== null && (now?.status === "running" || runningBefore !== now?.status || !document.getElementById("log")))
      await showDetail(selected);
  } catch (error) { document.getElementById("detail").replaceChildren(tp.el("div", { class: "error", text: error.message })); }
}
refresh();
setInterval(refresh, 1500);
