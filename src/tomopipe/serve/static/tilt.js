// Tilt-series viewer: step through the views with the keyboard, raw or aligned, with tilt angle,
// dose and the excluded flag; space toggles a view's exclusion mark, "Generate subset" makes the
// new tilt-series (and CTF) subset.
"use strict";
tp.header("tilt series");
const setId = tp.param("set");
let data = null, ts = null, index = 0;
const marked = {};

function render() {
  const list = data.series[ts], row = list[index], aligned = document.getElementById("aligned").checked;
  const isMarked = marked[ts]?.has(row.tilt_index);
  document.getElementById("info").replaceChildren(
    `${ts} view ${row.tilt_index + 1}/${list.length}: tilt ${tp.fmt(row.tilt_angle_deg)}°, dose ${tp.fmt(row.dose_e_per_A2, 2)} e⁻/Å², ` +
    `pre-exposure ${tp.fmt(row.pre_exposure_e_per_A2, 1)} e⁻/Å² `,
    tp.el("span", { class: "badge" + (row.enabled && !isMarked ? "" : " excl"), id: "state",
      text: row.enabled ? (isMarked ? "to exclude" : "included") : "excluded" }));
  document.getElementById("view").src = `/api/tilt-series/${setId}/image?ts=${encodeURIComponent(ts)}&tilt=${row.tilt_index}&aligned=${aligned ? 1 : 0}&max_px=512`;
  const table = document.getElementById("table");
  table.replaceChildren(tp.el("tr", {}, ...["view", "tilt (°)", "dose (e⁻/Å²)", "state"].map(t => tp.el("th", { text: t }))));
  list.forEach((r, i) => {
    const m = marked[ts]?.has(r.tilt_index);
    const tr = tp.el("tr", { class: [i === index ? "selected" : "", r.enabled ? "" : "excluded", m ? "marked" : ""].join(" ") },
      tp.el("td", { text: r.tilt_index + 1 }), tp.el("td", { text: tp.fmt(r.tilt_angle_deg) }), tp.el("td", { text: tp.fmt(r.dose_e_per_A2, 2) }),
      tp.el("td", { text: r.enabled ? (m ? "to exclude" : "") : "excluded" }));
    tr.addEventListener("click", () => { index = i; render(); });
    table.append(tr);
  });
}

document.addEventListener("keydown", event => {
  if (!data || event.target.tagName === "SELECT") return;
  const list = data.series[ts];
  if (event.key === "ArrowRight" || event.key === "ArrowDown") index = Math.min(list.length - 1, index + 1);
  else if (event.key === "ArrowLeft" || event.key === "ArrowUp") index = Math.max(0, index - 1);
  else if (event.key === " ") { const s = marked[ts] = marked[ts] || new Set(), t = list[index].tilt_index; s.has(t) ? s.delete(t) : s.add(t); }
  else if (event.key === "a") { const box = document.getElementById("aligned"); if (!box.disabled) box.checked = !box.checked; }
  else return;
  event.preventDefault(); render();
});

document.getElementById("subset").addEventListener("click", async () => {
  const exclude = Object.fromEntries(Object.entries(marked).filter(([, s]) => s.size).map(([t, s]) => [t, [...s].map(i => i + 1)]));
  const result = document.getElementById("result");
  if (!Object.keys(exclude).length) { result.className = "error"; result.textContent = "mark views with space first"; return; }
  try {
    const answer = await tp.post(`/api/tilt-series/${setId}/exclude`, { exclude, name: "exclude" });
    const out = answer.outputs.tilt_series;
    result.className = "ok";
    result.replaceChildren(`run ${answer.run_id}: new tilt-series set ${out.set_id} `, tp.el("a", { href: `/static/tilt.html?set=${out.set_id}`, text: "open it" }));
  } catch (error) { result.className = "error"; result.textContent = error.message; }
});

(async () => {
  data = await tp.get(`/api/tilt-series/${setId}`);
  const select = document.getElementById("ts"), box = document.getElementById("aligned");
  for (const name of Object.keys(data.series)) select.append(tp.el("option", { value: name, text: name }));
  ts = select.value;
  box.disabled = !data.has_aligned_images;
  if (box.disabled) box.parentElement.title = "this set has no aligned images";
  select.addEventListener("change", () => { ts = select.value; index = 0; render(); select.blur(); });
  box.addEventListener("change", render);
  render();
})();
