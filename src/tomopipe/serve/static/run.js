// A run form generated from a step's parameter schema: inputs (sets of the right kind), then one
// field per parameter with its type, unit, default and help; errors come back per field and are
// shown under it. ?step=TYPE preselects a step, ?from=RUN copies a run's step and parameters.
"use strict";
tp.header("new run");
const stepSelect = document.getElementById("step"), form = document.getElementById("form");
let schema = null, preset = {};

function field(param) {
  const id = `param-${param.name}`, value = param.name in preset ? preset[param.name] : param.default;
  let input;
  if (param.type === "bool") {
    input = tp.el("input", { type: "checkbox", id, name: param.name });
    input.checked = !!value;
  } else if (param.choices) {
    input = tp.el("select", { id, name: param.name });
    for (const choice of param.choices) input.append(tp.el("option", { value: choice, text: choice }));
    input.value = value ?? param.choices[0];
  } else {
    const numeric = param.type === "float" || param.type === "int";
    input = tp.el("input", { id, name: param.name, type: numeric ? "number" : "text", step: param.type === "int" ? "1" : "any",
      placeholder: value === null || value === undefined ? (param.required ? "required" : "not set") : "" });
    if (param.min !== null && numeric) input.min = param.min;
    if (param.max !== null && numeric) input.max = param.max;
    if (value !== null && value !== undefined) input.value = Array.isArray(value) ? value.join(",") : value;
  }
  const unit = param.unit ? ` (${param.unit})` : "";
  return tp.el("div", { class: "field" }, tp.el("label", { for: id, text: `${param.name}${unit}${param.required ? " *" : ""}` }), input,
    tp.el("small", { text: `${param.help} — ${param.type}, default ${param.default === null ? "not set" : JSON.stringify(param.default)}` }),
    tp.el("div", { class: "field-error", id: `error-${param.name}` }));
}

async function loadStep(type) {
  schema = await tp.get(`/api/steps/${type}`);
  document.getElementById("description").textContent = `${schema.title}. ${schema.description}`;
  form.replaceChildren(tp.el("label", { for: "run-name", text: "run name" }), tp.el("input", { id: "run-name", name: "__name", value: preset.__name || type }),
    tp.el("div", { class: "field-error", id: "error-name" }));
  for (const port of schema.inputs) {
    const select = tp.el("select", { id: `input-${port.name}`, "data-port": port.name });
    if (port.optional) select.append(tp.el("option", { value: "", text: "(none)" }));
    for (const c of port.candidates) select.append(tp.el("option", { value: c.set_id, text: c.label }));
    if (port.candidates.length) select.value = port.candidates[0].set_id;  // the newest set of that kind
    if (preset.__inputs && port.name in preset.__inputs) select.value = preset.__inputs[port.name];
    form.append(tp.el("label", { for: select.id, text: `input ${port.name}: ${port.kind}${port.optional ? " (optional)" : ""}` }), select,
      tp.el("small", { text: port.help }), tp.el("div", { class: "field-error", id: `error-${port.name}` }));
  }
  for (const param of schema.params) form.append(field(param));
}

async function launch() {
  const status = document.getElementById("status");
  for (const node of form.querySelectorAll(".field-error")) node.textContent = "";
  const params = {}, inputs = {};
  for (const param of schema.params) {
    const input = document.getElementById(`param-${param.name}`);
    params[param.name] = param.type === "bool" ? input.checked : input.value;
  }
  for (const select of form.querySelectorAll("select[data-port]")) inputs[select.dataset.port] = select.value;
  try {
    const answer = await tp.post("/api/runs", { step_type: schema.type, name: document.getElementById("run-name").value, params, inputs });
    status.className = ""; status.textContent = `job ${answer.job.id} queued`;
    poll(answer.job.id);
  } catch (error) {
    status.className = "error"; status.textContent = error.message;
    for (const [name, message] of Object.entries(error.body?.errors || {})) {
      const node = document.getElementById(`error-${name}`); if (node) node.textContent = message;
    }
  }
}

async function poll(jobId) {
  const status = document.getElementById("status"), job = await tp.get(`/api/jobs/${jobId}`);
  if (job.status === "queued" || job.status === "running") {
    status.textContent = `job ${job.id}: ${job.status}…`; setTimeout(() => poll(jobId), 700); return;
  }
  status.className = job.status === "finished" ? "ok" : "error";
  status.replaceChildren(`job ${job.id}: ${job.status}${job.run_id ? ` as run ${job.run_id}` : ""}${job.message ? " — " + job.message : ""} `,
    tp.el("a", { href: "/static/index.html", text: "project" }));
  status.dataset.state = job.status;
}

(async () => {
  const steps = (await tp.get("/api/steps")).steps;
  for (const s of steps) stepSelect.append(tp.el("option", { value: s.type, text: `${s.type} — ${s.title}` }));
  let initial = tp.param("step") || "exclude_views";
  if (tp.param("from")) {
    const run = await tp.get(`/api/runs/${tp.param("from")}`);
    initial = run.step_type;
    preset = { ...run.params, __name: run.name, __inputs: Object.fromEntries(run.inputs.map(i => [i.port, i.set_id])) };
  }
  stepSelect.value = initial;
  stepSelect.addEventListener("change", () => { preset = {}; loadStep(stepSelect.value); });
  document.getElementById("launch").addEventListener("click", launch);
  await loadStep(initial);
})();
