// Tomogram viewer and manual picking: Z slider, contrast, zoom, picks drawn; a click adds a pick,
// a click on a pick removes it; "Save" makes a new coordinate set (an edit_picks run).
// The slice PNG is binned by `factor` (header X-Downsample): PNG pixel j holds voxels j·factor … (j+1)·factor − 1,
// so voxel x (0-based) has its centre at (x + 0.5) / factor PNG pixels from the image's edge, and a point u
// (PNG pixels from the edge) is voxel u · factor − 0.5.
"use strict";
tp.header("tomogram");
const setId = tp.param("set");
const canvas = document.getElementById("view"), ctx = canvas.getContext("2d");
let info = null, tomo = null, picks = [], added = [], removed = new Set(), factor = 1, image = new Image(), radiusPx = 6;

const $ = id => document.getElementById(id);
function zoom() { return Number($("zoom").value); }

async function loadPicks() {
  const id = $("picks").value;
  picks = id ? (await tp.get(`/api/particles/${id}?ts=${encodeURIComponent(tomo.ts_id)}`)).picks : [];
  added = []; removed = new Set(); draw();
}

async function loadSlice() {
  const z = Number($("z").value);
  $("z-value").textContent = `${z} / ${tomo.size_xyz_px[2] - 1}`;
  const url = `/api/tomograms/${setId}/slice?ts=${encodeURIComponent(tomo.ts_id)}&axis=z&index=${z}&max_px=768` +
    `&thickness=${$("thickness").value}&low=${$("low").value}&high=${$("high").value}`;
  const response = await fetch(url);
  if (!response.ok) { $("result").textContent = (await response.json()).error; return; }
  factor = Number(response.headers.get("X-Downsample") || 1);
  const blob = await response.blob(), next = new Image();
  next.onload = () => { image = next; draw(); canvas.dataset.loadedZ = z; };
  next.src = URL.createObjectURL(blob);
}

function toScreen(xyz) { return [(xyz[0] + 0.5) / factor * zoom(), (xyz[1] + 0.5) / factor * zoom()]; }

function draw() {
  if (!image.width) return;
  canvas.width = image.width * zoom(); canvas.height = image.height * zoom();
  ctx.imageSmoothingEnabled = zoom() < 1;
  ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  const z = Number($("z").value), r = radiusPx / factor * zoom();
  const visible = p => Math.abs(p.xyz_px[2] - z) <= radiusPx;
  for (const p of picks) {
    if (!p.enabled || !visible(p)) continue;
    const [x, y] = toScreen(p.xyz_px);
    ctx.strokeStyle = removed.has(p.index) ? "#ff3030" : "#30ff60"; ctx.lineWidth = 2;
    ctx.beginPath(); ctx.arc(x, y, r, 0, 2 * Math.PI); ctx.stroke();
    if (removed.has(p.index)) { ctx.beginPath(); ctx.moveTo(x - r, y - r); ctx.lineTo(x + r, y + r); ctx.stroke(); }
  }
  for (const p of added) {
    if (Math.abs(p[2] - z) > radiusPx) continue;
    const [x, y] = toScreen(p);
    ctx.strokeStyle = "#ffd000"; ctx.lineWidth = 2; ctx.beginPath(); ctx.arc(x, y, r, 0, 2 * Math.PI); ctx.stroke();
  }
  $("pending").textContent = `${picks.filter(p => p.enabled).length} picks · ${added.length} to add · ${removed.size} to remove`;
}

canvas.addEventListener("click", event => {
  const rect = canvas.getBoundingClientRect();
  // from the canvas's content (inside its border), in PNG pixels
  const sx = (event.clientX - rect.left - canvas.clientLeft) / zoom(), sy = (event.clientY - rect.top - canvas.clientTop) / zoom();
  const vx = sx * factor - 0.5, vy = sy * factor - 0.5, z = Number($("z").value);
  const hit = (p) => Math.hypot(p[0] - vx, p[1] - vy) <= Math.max(radiusPx, factor * 4) && Math.abs(p[2] - z) <= radiusPx;
  const newIndex = added.findIndex(hit);
  if (newIndex >= 0) added.splice(newIndex, 1);
  else {
    const existing = picks.find(p => p.enabled && hit(p.xyz_px));
    if (existing) removed.has(existing.index) ? removed.delete(existing.index) : removed.add(existing.index);
    else added.push([vx, vy, z]);
  }
  draw();
});

$("save").addEventListener("click", async () => {
  const source = $("picks").value || String(setId);
  try {
    const answer = await tp.post("/api/picks", { source_set_id: Number(source), ts_id: tomo.ts_id,
      add_px: added, remove_index: [...removed], name: "picks" });
    const out = answer.outputs.particles;
    $("result").className = "ok"; $("result").textContent = `run ${answer.run_id}: new coordinate set ${out.set_id} (${out.n_items} items)`;
    const list = (await tp.get(`/api/tomograms/${setId}`)).particle_sets;
    fillPickSets(list, out.set_id); await loadPicks();
  } catch (error) { $("result").className = "error"; $("result").textContent = error.message; }
});

function fillPickSets(list, selectedId) {
  const select = $("picks");
  select.replaceChildren(tp.el("option", { value: "", text: "(none: start a new set)" }),
    ...list.map(s => tp.el("option", { value: s.set_id, text: `set ${s.set_id} · run ${s.run_id} ${s.run_name} (${s.n_items})` })));
  select.value = selectedId ?? (list[0]?.set_id ?? "");
}

(async () => {
  info = await tp.get(`/api/tomograms/${setId}`);
  const select = $("ts");
  for (const t of info.tomograms) select.append(tp.el("option", { value: t.ts_id, text: `${t.ts_id} (${t.size_xyz_px.join("×")}, ${t.voxel_size_A} Å)` }));
  const choose = async () => {
    tomo = info.tomograms.find(t => t.ts_id === select.value);
    radiusPx = Math.max(3, Math.round(60 / tomo.voxel_size_A));  // ~ an apoferritin radius
    $("z").max = tomo.size_xyz_px[2] - 1; $("z").value = Math.floor(tomo.size_xyz_px[2] / 2);
    await loadSlice(); await loadPicks();
  };
  fillPickSets(info.particle_sets);
  select.addEventListener("change", choose);
  $("picks").addEventListener("change", loadPicks);
  for (const id of ["z", "low", "high", "thickness"]) $(id).addEventListener("input", loadSlice);
  $("zoom").addEventListener("change", draw);
  await choose();
})();
