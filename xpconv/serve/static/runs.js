// The runs page of `xpconv serve`: each run's learning curves, polled while they grow.
"use strict";
(() => {
  const SVG = "http://www.w3.org/2000/svg";
  const main = document.getElementById("runs");
  const status = document.getElementById("status");
  const poll = Math.max(200, Number(new URLSearchParams(location.search).get("poll")) || 2000);
  const MAX_SHOWN = 20;
  const COLORS = { train_loss: "#2456a6", val_loss: "#c05a00", test_loss: "#2a8a3e",
                   train_acc: "#2456a6", val_acc: "#c05a00", test_acc: "#2a8a3e", lr: "#7a3fa0" };
  const CHARTS = [
    { cls: "loss", title: "loss", keys: ["train_loss", "val_loss", "test_loss"] },
    { cls: "acc", title: "accuracy", keys: ["train_acc", "val_acc", "test_acc"] },
    { cls: "lr", title: "learning rate", keys: ["lr"] },
  ];
  const sections = new Map();  // run name -> {section, count}

  function el(name, attrs, text) {
    const e = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function fmt(v) {
    if (v === 0) return "0";
    const a = Math.abs(v);
    return a >= 100 || a < 0.001 ? v.toExponential(1) : v.toPrecision(3).replace(/\.?0+$/, "");
  }

  // One chart: a polyline per series over the epochs; the SVG carries data-points (epochs drawn).
  function chart(svg, spec, records, config) {
    svg.replaceChildren();
    const W = 360, H = 220, L = 52, R = 10, T = 22, B = 30;
    const series = [];
    for (const key of spec.keys) {
      let pts = records.filter((r) => typeof r[key] === "number").map((r) => [r.epoch, r[key]]);
      if (key === "lr" && !pts.length && config && typeof config.lr === "number") {
        pts = records.map((r) => [r.epoch, config.lr]);  // a constant rate: the run's setting
      }
      if (pts.length) series.push([key, pts]);
    }
    const n = records.length;
    svg.dataset.points = String(n);
    svg.append(el("text", { x: L, y: 14, class: "title" }, spec.title));
    const all = series.flatMap(([, p]) => p);
    if (!all.length) {
      svg.append(el("text", { x: L, y: H / 2 }, "no values yet"));
      return;
    }
    const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
    let x0 = Math.min(...xs), x1 = Math.max(...xs);
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    let y0 = Math.min(...ys), y1 = Math.max(...ys);
    if (spec.cls === "acc") y1 = Math.min(1, y1 + 0.02);
    if (spec.cls === "loss") y0 = Math.min(0, y0);
    if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
    const X = (v) => L + ((v - x0) / (x1 - x0)) * (W - L - R);
    const Y = (v) => H - B - ((v - y0) / (y1 - y0)) * (H - T - B);
    for (let i = 0; i <= 4; i++) {
      const v = y0 + ((y1 - y0) * i) / 4;
      svg.append(el("line", { x1: L, x2: W - R, y1: Y(v), y2: Y(v), class: "grid" }));
      svg.append(el("text", { x: L - 4, y: Y(v) + 4, "text-anchor": "end" }, fmt(v)));
    }
    svg.append(el("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
    svg.append(el("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
    const step = Math.max(1, Math.ceil((x1 - x0) / 6));
    for (let v = Math.ceil(x0); v <= x1; v += step) {
      svg.append(el("text", { x: X(v), y: H - B + 14, "text-anchor": "middle" }, String(v)));
    }
    svg.append(el("text", { x: W - R, y: H - 2, "text-anchor": "end" }, "epoch"));
    let lx = L + spec.title.length * 7.5 + 14;  // the legend after the title
    for (const [key, pts] of series) {
      const color = COLORS[key] || "#333";
      svg.append(el("polyline", { points: pts.map(([a, b]) => `${X(a)},${Y(b)}`).join(" "), stroke: color, "data-key": key }));
      for (const [a, b] of pts) svg.append(el("circle", { cx: X(a), cy: Y(b), r: 2.5, fill: color }));
      svg.append(el("text", { x: lx, y: 14, fill: color, class: "legend" }, key));
      lx += 8 + key.length * 6.5;
    }
  }

  function section(name) {
    if (sections.has(name)) return sections.get(name);
    const s = document.createElement("section");
    s.className = "run";
    s.dataset.run = name;
    const h = document.createElement("h2");
    h.textContent = name;
    const info = document.createElement("p");
    info.className = "small";
    const charts = document.createElement("div");
    charts.className = "charts";
    for (const spec of CHARTS) charts.append(el("svg", { class: `chart ${spec.cls}`, viewBox: "0 0 360 220", role: "img", "aria-label": spec.title }));
    s.append(h, info, charts);
    main.append(s);
    const entry = { section: s, info, charts };
    sections.set(name, entry);
    return entry;
  }

  async function update(name) {
    const r = await fetch(`/api/runs/${encodeURIComponent(name)}/metrics`);
    const doc = await r.json();
    const entry = section(name);
    if (!r.ok) { entry.info.textContent = doc.error || `HTTP ${r.status}`; return; }
    const records = doc.records.filter((x) => typeof x.epoch === "number").sort((a, b) => a.epoch - b.epoch);
    const c = doc.config || {};
    const last = records[records.length - 1];
    const parts = [];
    if (c.model) parts.push(`${c.model} on ${c.dataset}`);
    if (c.optimizer) parts.push(`${c.optimizer} lr ${c.lr}`);
    parts.push(`${records.length}${c.epochs ? " of " + c.epochs : ""} epochs`);
    if (last && typeof last.test_acc === "number") parts.push(`test accuracy ${last.test_acc.toFixed(4)}`);
    if (doc.writing) parts.push("training now");
    entry.info.textContent = parts.join(" · ");
    entry.section.dataset.epochs = String(records.length);
    CHARTS.forEach((spec, i) => chart(entry.charts.children[i], spec, records, c));
  }

  async function tick() {
    try {
      const r = await fetch("/api/runs");
      const doc = await r.json();
      const runs = doc.runs.sort((a, b) => b.modified - a.modified).slice(0, MAX_SHOWN);
      status.textContent = runs.length
        ? `${doc.runs.length} run(s) in ${doc.runs_dir}; refreshed every ${poll / 1000} s`
        : `no runs in ${doc.runs_dir} yet (xpconv train writes them there); looking again every ${poll / 1000} s`;
      status.classList.remove("error");
      for (const run of runs) await update(run.name);
      document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
    } catch (err) {
      status.textContent = `cannot read the runs: ${err.message}`;
      status.classList.add("error");
    }
    setTimeout(tick, poll);
  }
  tick();
})();
