// Small hand-written SVG charts (no library, no network): a time line and bars with an overlay line.
"use strict";

const Charts = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const PAD = { left: 38, right: 34, top: 10, bottom: 22 };

  function node(tag, attrs, text) {
    const el = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    return el;
  }

  // Draws in CSS pixels: the viewBox is made as wide as the chart is shown, so its labels keep their
  // size on a phone (a fixed 820-unit box shrunk to 300 px left 4 px text).
  function frame(svg) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const [, , boxWidth, h] = svg.getAttribute("viewBox").split(" ").map(Number);
    const w = Math.round(svg.clientWidth) || boxWidth;
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    return { w, h, x0: PAD.left, x1: w - PAD.right, y0: h - PAD.bottom, y1: PAD.top };
  }

  // A "nice" upper bound for an axis: 1, 2 or 5 times a power of ten.
  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function yAxis(svg, f, max, fmt, right) {
    const x = right ? f.x1 : f.x0;
    svg.appendChild(node("line", { class: "axis", x1: x, x2: x, y1: f.y1, y2: f.y0 }));
    for (let i = 0; i <= 2; i++) {
      const v = max * i / 2, y = f.y0 - (f.y0 - f.y1) * i / 2;
      if (!right) svg.appendChild(node("line", { class: "axis", x1: f.x0, x2: f.x1, y1: y, y2: y }));
      svg.appendChild(node("text", { x: right ? x + 4 : x - 4, y: y + 3, "text-anchor": right ? "start" : "end" },
                           fmt(v)));
    }
  }

  function empty(svg, f, message) {
    svg.appendChild(node("text", { class: "empty", x: (f.x0 + f.x1) / 2, y: (f.y0 + f.y1) / 2,
                                   "text-anchor": "middle" }, message));
  }

  // points: [{t, [key]: value|null}], x spans [now - span, now]; gaps (null) break the line.
  function timeLine(svg, points, key, opts) {
    const f = frame(svg);
    const now = opts.now, span = opts.span;
    const values = points.filter(p => p[key] !== null && p.t >= now - span);
    const max = niceMax(Math.max(opts.minMax || 0, ...values.map(p => p[key])));
    yAxis(svg, f, max, opts.fmt || (v => String(+v.toFixed(2))), false);
    for (const [label, t] of [["-60 min", now - span], ["-30", now - span / 2], ["now", now]]) {
      const x = f.x0 + (f.x1 - f.x0) * (t - (now - span)) / span;
      svg.appendChild(node("text", { x, y: f.h - 6, "text-anchor": "middle" }, label));
    }
    if (!values.length) return empty(svg, f, opts.emptyText || "no data yet");
    const sx = t => f.x0 + (f.x1 - f.x0) * (t - (now - span)) / span;
    const sy = v => f.y0 - (f.y0 - f.y1) * v / max;
    let d = "", prev = null;
    for (const p of values) {
      const gap = prev === null || p.t - prev > 1.5 * opts.bucket;
      d += `${gap ? "M" : "L"}${sx(p.t).toFixed(1)},${sy(p[key]).toFixed(1)}`;
      prev = p.t;
    }
    svg.appendChild(node("path", { class: `line-${opts.color || "a"}`, d }));
    for (const p of values.length < 40 ? values : []) {
      svg.appendChild(node("circle", { class: `dot-${opts.color || "a"}`, cx: sx(p.t), cy: sy(p[key]), r: 2 }));
    }
  }

  // rows: [{[xKey], [barKey], [lineKey]}]: bars on the left axis, line + dots on the right axis.
  function barsAndLine(svg, rows, xKey, barKey, lineKey, opts) {
    const f = frame(svg);
    if (!rows.length) {
      yAxis(svg, f, 1, v => String(v), false);
      return empty(svg, f, opts.emptyText || "no data yet");
    }
    const barMax = niceMax(Math.max(opts.barMax || 0, ...rows.map(r => r[barKey])));
    const lineVals = rows.map(r => r[lineKey]).filter(v => v !== null);
    const lineMax = niceMax(Math.max(opts.lineMax || 0, ...lineVals));
    yAxis(svg, f, barMax, opts.barFmt || (v => String(+v.toFixed(2))), false);
    yAxis(svg, f, lineMax, opts.lineFmt || (v => String(+v.toFixed(2))), true);
    const slot = (f.x1 - f.x0) / rows.length, bw = Math.max(2, slot * 0.6);
    let d = "";
    rows.forEach((r, i) => {
      const cx = f.x0 + slot * (i + 0.5);
      if (r[barKey] !== null) {   // null: nothing measured there (no bar, unlike a measured 0)
        const bh = (f.y0 - f.y1) * r[barKey] / barMax;
        svg.appendChild(node("rect", { class: "bar-a", x: cx - bw / 2, y: f.y0 - bh, width: bw, height: bh }));
      }
      svg.appendChild(node("text", { x: cx, y: f.h - 6, "text-anchor": "middle" }, String(r[xKey])));
      if (r[lineKey] !== null) {
        const y = f.y0 - (f.y0 - f.y1) * r[lineKey] / lineMax;
        d += `${d ? "L" : "M"}${cx.toFixed(1)},${y.toFixed(1)}`;
        svg.appendChild(node("circle", { class: "dot-b", cx, cy: y, r: 3 }));
      }
    });
    if (d) svg.appendChild(node("path", { class: "line-b", d }));
  }

  return { timeLine, barsAndLine };
})();
