// Line charts over the last 15 minutes, drawn as SVG: a few lines of our own instead of a
// library, so the console needs nothing fetched and nothing built.
"use strict";

window.CorralCharts = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const W = 320, H = 120, PAD_L = 44, PAD_B = 18, PAD_T = 8, PAD_R = 6;

  function node(tag, attrs, text) {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
    if (text !== undefined) n.textContent = text;
    return n;
  }

  function nice(max) {
    if (!(max > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(max)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= max) return m * p;
    return 10 * p;
  }

  function label(v) {
    if (v >= 1000) return (v / 1000).toFixed(v >= 10000 ? 0 : 1) + "k";
    if (v >= 10 || v === 0) return v.toFixed(0);
    return v >= 1 ? v.toFixed(1) : String(Number(v.toPrecision(2)));
  }

  // series: [{cls, points: [[tMs, value|null], ...]}]; spanMs: the width of the window, ending now
  function draw(svg, series, spanMs, nowMs) {
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.replaceChildren();
    const start = nowMs - spanMs;
    let max = 0;
    for (const s of series) for (const [, v] of s.points) if (v !== null && v > max) max = v;
    const top = nice(max);
    const x = (t) => PAD_L + ((t - start) / spanMs) * (W - PAD_L - PAD_R);
    const y = (v) => H - PAD_B - (v / top) * (H - PAD_B - PAD_T);
    for (const f of [0, 0.5, 1]) {
      const yy = y(top * f);
      svg.append(node("line", { x1: PAD_L, x2: W - PAD_R, y1: yy, y2: yy, class: "gridline" }));
      svg.append(node("text", { x: PAD_L - 4, y: yy + 4, class: "axis", "text-anchor": "end" }, label(top * f)));
    }
    svg.append(node("text", { x: PAD_L, y: H - 4, class: "axis" }, "-15 min"));
    svg.append(node("text", { x: W - PAD_R, y: H - 4, class: "axis", "text-anchor": "end" }, "now"));
    for (const s of series) {
      let d = "";
      let pen = false;
      for (const [t, v] of s.points) {
        if (t < start || v === null) { pen = false; continue; }
        d += `${pen ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
        pen = true;
      }
      if (d) svg.append(node("path", { d, class: `line ${s.cls}` }));
    }
  }

  return { draw };
})();
