// Shared helpers of the tomopipe pages: JSON requests (writes carry the page's own Origin and a
// JSON body, as the server requires), query parameters, the header.
"use strict";
const tp = {
  param(name) { return new URLSearchParams(location.search).get(name); },
  async get(url) {
    const response = await fetch(url, { credentials: "same-origin" });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || response.statusText);
    return body;
  },
  async post(url, data) {
    const response = await fetch(url, { method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify(data) });
    const body = await response.json();
    if (!response.ok) { const error = new Error(body.error || response.statusText); error.body = body; throw error; }
    return body;
  },
  el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key === "text") node.textContent = value; else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of children) node.append(child);
    return node;
  },
  svg(tag, attrs = {}) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
    return node;
  },
  header(title) {
    const bar = tp.el("header", {}, tp.el("b", { text: "tomopipe" }),
      tp.el("a", { href: "/static/index.html", text: "project" }), tp.el("a", { href: "/static/run.html", text: "new run" }),
      tp.el("span", { text: title }));
    document.body.prepend(bar);
  },
  viewerUrl(kind, setId) {
    const page = { tilt_series: "tilt", ctf: "ctf", tomograms: "tomogram", maps: "map" }[kind];
    return page ? `/static/${page}.html?set=${setId}` : null;
  },
  fmt(value, digits = 1) { return value === null || value === undefined ? "–" : Number(value).toFixed(digits); },
  // A line plot in an SVG: series [{x: [...], y: [...], color, label}], optional horizontal lines.
  plot(svg, series, { xlabel = "", ylabel = "", hlines = [], marks = [] } = {}) {
    svg.replaceChildren();
    const W = +svg.getAttribute("width"), H = +svg.getAttribute("height"), L = 56, R = 10, T = 10, B = 34;
    const xs = series.flatMap(s => s.x).filter(Number.isFinite), ys = series.flatMap(s => s.y).filter(Number.isFinite)
      .concat(hlines.map(h => h.y));
    if (!xs.length) return;
    let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    if (x1 === x0) x1 = x0 + 1; if (y1 === y0) y1 = y0 + 1;
    const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
    const px = x => L + (x - x0) / (x1 - x0) * (W - L - R), py = y => T + (y1 - y) / (y1 - y0) * (H - T - B);
    svg.append(tp.svg("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "#fff", stroke: "#999" }));
    for (const [v, anchor, x, y] of [[x0, "start", L, H - B + 14], [x1, "end", W - R, H - B + 14]])
      svg.append(Object.assign(tp.svg("text", { x, y, "text-anchor": anchor }), { textContent: +v.toPrecision(3) }));
    for (const [v, y] of [[y1, T + 10], [y0, H - B]])
      svg.append(Object.assign(tp.svg("text", { x: L - 4, y, "text-anchor": "end" }), { textContent: +v.toPrecision(4) }));
    svg.append(Object.assign(tp.svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }), { textContent: xlabel }));
    svg.append(Object.assign(tp.svg("text", { x: 4, y: T + (H - T - B) / 2, "text-anchor": "start" }), { textContent: ylabel }));
    for (const h of hlines) {
      svg.append(tp.svg("line", { x1: L, x2: W - R, y1: py(h.y), y2: py(h.y), stroke: h.color || "#888", "stroke-dasharray": "4 3" }));
      svg.append(Object.assign(tp.svg("text", { x: W - R - 2, y: py(h.y) - 2, "text-anchor": "end", fill: h.color || "#555" }),
        { textContent: h.label || "" }));
    }
    for (const m of marks)
      svg.append(tp.svg("line", { x1: px(m.x), x2: px(m.x), y1: T, y2: H - B, stroke: m.color || "#c00", "stroke-dasharray": "2 2" }));
    series.forEach((s, k) => {
      const points = s.x.map((x, i) => [x, s.y[i]]).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
      svg.append(tp.svg("polyline", { points: points.map(([x, y]) => `${px(x)},${py(y)}`).join(" "), fill: "none",
        stroke: s.color || "#1f5fbf", "stroke-width": 1.5 }));
      if (s.dots) for (const [i, [x, y]] of points.entries())
        svg.append(tp.svg("circle", { cx: px(x), cy: py(y), r: s.selected === i ? 5 : 3, fill: s.dotColors ? s.dotColors[i] : s.color }));
      svg.append(Object.assign(tp.svg("text", { x: L + 6, y: T + 14 + 14 * k, fill: s.color || "#1f5fbf" }), { textContent: s.label || "" }));
    });
  },
};
