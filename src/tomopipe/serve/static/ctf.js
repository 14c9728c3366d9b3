// CTF viewer: per tilt the power spectrum with the fitted model, defocus and astigmatism against
// tilt; select a tilt (click or arrow keys), space marks it for exclusion, "Generate subset" makes
// a new run whose CTF and tilt-series sets flag the marked tilts (nothing is deleted).
"use strict";
tp.header("CTF viewer");
const setId = tp.param("set");
let data = null, ts = null, index = 0;
const marked = {};  // ts -> Set of tilt_index

function rows() { return data.series[ts]; }

function render() {
  const table = document.getElementById("table"), list = rows();
  table.replaceChildren(tp.el("tr", {}, ...["view", "tilt (°)", "defocus (Å)", "astig. (Å)", "fit res. (Å)", "state"].map(t => tp.el("th", { text: t }))));
  list.forEach((row, i) => {
    const isMarked = marked[ts]?.has(row.tilt_index);
    const tr = tp.el("tr", { "data-tilt": row.tilt_index, class: [i === index ? "selected" : "", row.enabled ? "" : "excluded", isMarked ? "marked" : ""].join(" ") },
      tp.el("td", { text: row.tilt_index + 1 }), tp.el("td", { text: tp.fmt(row.tilt_angle_deg) }), tp.el("td", { text: tp.fmt(row.defocus_mean_A, 0) }),
      tp.el("td", { text: tp.fmt(row.astigmatism_A, 0) }), tp.el("td", { text: tp.fmt(row.fit_resolution_A) }),
      tp.el("td", { text: row.enabled ? (isMarked ? "to exclude" : "") : "excluded" }));
    tr.addEventListener("click", () => { index = i; render(); });
    table.append(tr);
  });
  const row = list[index];
  document.getElementById("tilt-info").textContent =
    `${ts} view ${row.tilt_index + 1}: tilt ${tp.fmt(row.tilt_angle_deg)}°, defocus U ${tp.fmt(row.defocus_u_A, 0)} Å, V ${tp.fmt(row.defocus_v_A, 0)} Å, ` +
    `angle ${tp.fmt(row.defocus_angle_deg)}°, fit to ${tp.fmt(row.fit_resolution_A)} Å`;
  const img = document.getElementById("spectrum");
  img.src = row.has_spectrum ? `/api/ctf/${setId}/spectrum?ts=${encodeURIComponent(ts)}&tilt=${row.tilt_index}&max_px=512` : "";
  drawRings(row);
  const x = list.map(r => r.tilt_angle_deg), colors = list.map(r => !r.enabled ? "#aaa" : marked[ts]?.has(r.tilt_index) ? "#d00" : "#1f5fbf");
  tp.plot(document.getElementById("defocus-plot"), [{ x, y: list.map(r => r.defocus_mean_A), dots: true, dotColors: colors, selected: index, label: "defocus (Å)" }],
    { xlabel: "tilt (°)", ylabel: "Å", marks: [{ x: row.tilt_angle_deg }] });
  tp.plot(document.getElementById("astig-plot"), [{ x, y: list.map(r => r.astigmatism_A), dots: true, dotColors: colors, selected: index, color: "#8a3ffc", label: "astigmatism |U−V| (Å)" }],
    { xlabel: "tilt (°)", ylabel: "Å", marks: [{ x: row.tilt_angle_deg }] });
}

// The fitted CTF's zeros over the observed (left) half of the spectrum, in the spectrum's pixels.
async function drawRings(row) {
  const svg = document.getElementById("rings");
  svg.replaceChildren();
  if (!row.has_spectrum || !document.getElementById("show-rings").checked) return;
  const answer = await tp.get(`/api/ctf/${setId}/rings?ts=${encodeURIComponent(ts)}&tilt=${row.tilt_index}`);
  if (rows()[index] !== row) return;  // another tilt was selected meanwhile
  const w = answer.size_px;
  svg.setAttribute("viewBox", `0 0 ${w} ${w}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const clip = tp.svg("clipPath", { id: "left-half" });
  clip.append(tp.svg("rect", { x: 0, y: 0, width: w / 2, height: w }));
  svg.append(clip);
  for (const ring of answer.rings)
    svg.append(tp.svg("polyline", { points: ring.map(([x, y]) => `${x + 0.5},${y + 0.5}`).join(" "), fill: "none",
      stroke: "#ffd000", "stroke-width": 0.6, "stroke-dasharray": "2 1.5", "clip-path": "url(#left-half)", class: "ring" }));
}
document.getElementById("show-rings").addEventListener("change", () => render());

document.addEventListener("keydown", event => {
  if (!data || event.target.tagName === "SELECT" || event.target.tagName === "INPUT") return;
  if (event.key === "ArrowDown" || event.key === "ArrowRight") { index = Math.min(rows().length - 1, index + 1); }
  else if (event.key === "ArrowUp" || event.key === "ArrowLeft") { index = Math.max(0, index - 1); }
  else if (event.key === " ") {
    const tilt = rows()[index].tilt_index, set = marked[ts] = marked[ts] || new Set();
    set.has(tilt) ? set.delete(tilt) : set.add(tilt);
  } else return;
  event.preventDefault(); render();
});

document.getElementById("subset").addEventListener("click", async () => {
  const exclude = Object.fromEntries(Object.entries(marked).filter(([, s]) => s.size).map(([t, s]) => [t, [...s].map(i => i + 1)]));
  const result = document.getElementById("result");
  if (!Object.keys(exclude).length) { result.className = "error"; result.textContent = "mark tilts with space first"; return; }
  result.className = ""; result.textContent = "making the subset…";
  try {
    const answer = await tp.post(`/api/ctf/${setId}/subset`, { exclude, name: "exclude" });
    const ctf = answer.outputs.ctf;
    result.className = "ok";
    result.replaceChildren(`run ${answer.run_id}: new CTF set ${ctf.set_id} `, tp.el("a", { id: "new-set", href: `/static/ctf.html?set=${ctf.set_id}`, text: "open it" }));
  } catch (error) { result.className = "error"; result.textContent = error.message; }
});

(async () => {
  data = await tp.get(`/api/ctf/${setId}`);
  const select = document.getElementById("ts");
  for (const name of Object.keys(data.series)) select.append(tp.el("option", { value: name, text: name }));
  ts = select.value;
  select.addEventListener("change", () => { ts = select.value; index = 0; render(); select.blur(); });
  render();
})();
