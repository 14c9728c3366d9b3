// Map viewer: orthogonal sections, an iso-surface (WebGL2 ray marching through a binned 8-bit
// 3-D texture, shaded by the gradient), FSC curves with the 0.143 and 0.5 lines and the resolution.
"use strict";
tp.header("map");
const setId = tp.param("set");
const $ = id => document.getElementById(id);
let info = null, box = 0, gl = null, program = null, yaw = 0.6, pitch = 0.4, volumeReady = false;

function slices() {
  const name = $("map").value, i = Number($("index").value);
  $("index-value").textContent = `${i} / ${box - 1}`;
  for (const axis of ["z", "y", "x"])
    $(`slice-${axis}`).src = `/api/maps/${setId}/slice?map=${encodeURIComponent(name)}&axis=${axis}&index=${i}&max_px=256`;
}

function fsc() {
  const f = info.fsc, svg = $("fsc");
  const colors = { fsc_corrected: "#d00", fsc: "#1f5fbf", fsc_masked: "#8a3ffc", fsc_unmasked: "#1f5fbf", fsc_randomised_masked: "#999" };
  const series = Object.entries(f.curves).map(([name, y]) => ({ x: f.frequency_per_A, y, label: name, color: colors[name] || "#333" }));
  const marks = f.resolution_A ? [{ x: 1 / f.resolution_A }] : [];
  tp.plot(svg, series, { xlabel: "spatial frequency (1/Å)", ylabel: "FSC",
    hlines: [{ y: 0.143, label: "0.143", color: "#d00" }, { y: 0.5, label: "0.5", color: "#555" }], marks });
  $("resolution").textContent = f.resolution_A ? `resolution (FSC 0.143): ${tp.fmt(f.resolution_A, 2)} Å` : "no FSC in this set";
}

const VERTEX = `#version 300 es
in vec2 corner; out vec2 uv; void main() { uv = corner; gl_Position = vec4(corner, 0.0, 1.0); }`;
const FRAGMENT = `#version 300 es
precision highp float; precision highp sampler3D;
uniform sampler3D volume; uniform mat3 rotation; uniform float level; in vec2 uv; out vec4 color;
void main() {
  vec3 origin = rotation * vec3(uv * 0.9, -1.5), dir = rotation * vec3(0.0, 0.0, 1.0);
  float step = 1.0 / 192.0; color = vec4(0.0, 0.0, 0.0, 1.0);
  for (int i = 0; i < 576; i++) {
    vec3 p = origin + dir * (float(i) * step);
    vec3 t = p * 0.5 + 0.5;
    if (any(lessThan(t, vec3(0.0))) || any(greaterThan(t, vec3(1.0)))) continue;
    if (texture(volume, t).r >= level) {
      float e = 1.0 / 64.0;
      vec3 g = vec3(texture(volume, t + vec3(e, 0, 0)).r - texture(volume, t - vec3(e, 0, 0)).r,
                    texture(volume, t + vec3(0, e, 0)).r - texture(volume, t - vec3(0, e, 0)).r,
                    texture(volume, t + vec3(0, 0, e)).r - texture(volume, t - vec3(0, 0, e)).r);
      vec3 n = -normalize(g + 1e-6);
      float light = 0.25 + 0.75 * max(dot(n, -dir), 0.0);
      color = vec4(vec3(0.55, 0.75, 1.0) * light, 1.0); return;
    }
  }
}`;

function setupGl() {
  const canvas = $("iso");
  gl = canvas.getContext("webgl2");
  if (!gl) { $("gl-status").textContent = "WebGL2 is not available in this browser"; return false; }
  const compile = (type, source) => { const s = gl.createShader(type); gl.shaderSource(s, source); gl.compileShader(s);
    if (!gl.getShaderParameter(s, gl.COMPILE_STATUS)) throw new Error(gl.getShaderInfoLog(s)); return s; };
  program = gl.createProgram();
  gl.attachShader(program, compile(gl.VERTEX_SHADER, VERTEX)); gl.attachShader(program, compile(gl.FRAGMENT_SHADER, FRAGMENT));
  gl.linkProgram(program); gl.useProgram(program);
  const buffer = gl.createBuffer(); gl.bindBuffer(gl.ARRAY_BUFFER, buffer);
  gl.bufferData(gl.ARRAY_BUFFER, new Float32Array([-1, -1, 1, -1, -1, 1, 1, 1]), gl.STATIC_DRAW);
  const location = gl.getAttribLocation(program, "corner");
  gl.enableVertexAttribArray(location); gl.vertexAttribPointer(location, 2, gl.FLOAT, false, 0, 0);
  let dragging = null;
  canvas.addEventListener("mousedown", e => { dragging = [e.clientX, e.clientY]; });
  window.addEventListener("mouseup", () => { dragging = null; });
  canvas.addEventListener("mousemove", e => { if (!dragging) return; yaw += (e.clientX - dragging[0]) * 0.01;
    pitch += (e.clientY - dragging[1]) * 0.01; dragging = [e.clientX, e.clientY]; render3d(); });
  return true;
}

async function loadVolume() {
  if (!gl) return;
  const response = await fetch(`/api/maps/${setId}/volume?map=${encodeURIComponent($("map").value)}&max_px=64`);
  const shape = response.headers.get("X-Shape").split(",").map(Number), bytes = new Uint8Array(await response.arrayBuffer());
  const texture = gl.createTexture(); gl.bindTexture(gl.TEXTURE_3D, texture);
  gl.pixelStorei(gl.UNPACK_ALIGNMENT, 1);
  gl.texImage3D(gl.TEXTURE_3D, 0, gl.R8, shape[2], shape[1], shape[0], 0, gl.RED, gl.UNSIGNED_BYTE, bytes);
  for (const p of [gl.TEXTURE_MIN_FILTER, gl.TEXTURE_MAG_FILTER]) gl.texParameteri(gl.TEXTURE_3D, p, gl.LINEAR);
  for (const p of [gl.TEXTURE_WRAP_S, gl.TEXTURE_WRAP_T, gl.TEXTURE_WRAP_R]) gl.texParameteri(gl.TEXTURE_3D, p, gl.CLAMP_TO_EDGE);
  const level = Number(response.headers.get("X-Iso-Level"));  // wraps the brightest tenth of the box
  if (level > 0) $("level").value = level;
  volumeReady = true; render3d();
  $("gl-status").textContent = `${shape.join("×")} voxels (binned by ${response.headers.get("X-Downsample")})`;
}

function render3d() {
  if (!volumeReady) return;
  const cy = Math.cos(yaw), sy = Math.sin(yaw), cp = Math.cos(pitch), sp = Math.sin(pitch);
  const rotation = [cy, 0, -sy, sy * sp, cp, cy * sp, sy * cp, -sp, cy * cp];  // column-major: yaw about y, then pitch about x
  gl.viewport(0, 0, gl.canvas.width, gl.canvas.height);
  gl.uniformMatrix3fv(gl.getUniformLocation(program, "rotation"), false, rotation);
  gl.uniform1f(gl.getUniformLocation(program, "level"), Number($("level").value) / 255);
  gl.uniform1i(gl.getUniformLocation(program, "volume"), 0);
  gl.drawArrays(gl.TRIANGLE_STRIP, 0, 4);
  $("iso").dataset.rendered = "1";
}

(async () => {
  info = await tp.get(`/api/maps/${setId}`);
  const select = $("map");
  for (const m of info.maps) select.append(tp.el("option", { value: m.map_name, text: `${m.map_name} (${m.box_px}³, ${m.voxel_size_A} Å)` }));
  const preferred = ["sharpened", "full", "masked", "half1"].find(n => info.maps.some(m => m.map_name === n));
  if (preferred) select.value = preferred;
  const choose = () => { box = info.maps.find(m => m.map_name === select.value).box_px; $("index").max = box - 1;
    $("index").value = Math.floor(box / 2); slices(); loadVolume(); };
  select.addEventListener("change", choose);
  $("index").addEventListener("input", slices);
  $("level").addEventListener("input", render3d);
  fsc();
  try { setupGl(); } catch (error) { $("gl-status").textContent = `WebGL: ${error.message}`; gl = null; }
  choose();
})();
