// The drawing page of `xpconv serve`: strokes on a canvas -> an input like the training
// data's -> POST /api/predict -> bar chart, predicted class, first-layer feature maps.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const pad = $("pad");
  const ctx = pad.getContext("2d", { willReadFrequently: true });
  const status = $("status");
  const predicted = $("predicted");
  let info = null;          // GET /api/model
  let drawing = false;
  let last = null;
  let strokes = 0;          // strokes finished since the last clear
  let inFlight = false;     // one request at a time; the newest drawing goes next
  let pending = false;
  let lastSent = 0;

  function say(text, error) {
    status.textContent = text;
    status.classList.toggle("error", !!error);
  }

  function blank() {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, pad.width, pad.height);
  }

  function reset() {
    blank();
    strokes = 0;
    predicted.textContent = "–";
    predicted.dataset.class = "";
    predicted.dataset.strokes = "0";
    $("confidence").textContent = "";
    drawBars(null);
    $("maps").replaceChildren();
    const ic = $("input").getContext("2d");
    ic.fillStyle = "#000";
    ic.fillRect(0, 0, $("input").width, $("input").height);
  }

  // ------------------------------------------------------------------ drawing

  function pos(e) {
    const r = pad.getBoundingClientRect();
    return [(e.clientX - r.left) * pad.width / r.width, (e.clientY - r.top) * pad.height / r.height];
  }

  function segment(a, b) {
    ctx.strokeStyle = "#fff";
    ctx.fillStyle = "#fff";
    ctx.lineWidth = pad.width / 11;  // about 2.5 pixels once a tall digit is scaled to a 20-pixel box, as in MNIST
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(a[0], a[1]);
    ctx.lineTo(b[0], b[1]);
    ctx.stroke();
  }

  pad.addEventListener("pointerdown", (e) => {
    if (e.button !== 0) return;
    pad.setPointerCapture(e.pointerId);
    drawing = true;
    last = pos(e);
    segment(last, last);
    e.preventDefault();
  });
  pad.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    const p = pos(e);
    segment(last, p);
    last = p;
    if (performance.now() - lastSent > 120) predictDrawing();  // live answers while drawing
    e.preventDefault();
  });
  const end = (e) => {
    if (!drawing) return;
    drawing = false;
    strokes += 1;
    predictDrawing();
    e.preventDefault();
  };
  pad.addEventListener("pointerup", end);
  pad.addEventListener("pointercancel", end);
  $("clear").addEventListener("click", reset);

  // ------------------------------------------------------------------ preprocessing

  // The strokes as the training data looks: the ink's bounding box scaled to the
  // model's box (MNIST: 20x20 of 28x28, aspect kept), then placed so that its centre of
  // mass (MNIST) or its box (the 8x8 digits) sits at the image's centre.
  function toInput() {
    const [, H, W] = info.input_dim;
    const { fit, center } = info.preprocess;
    const src = ctx.getImageData(0, 0, pad.width, pad.height).data;
    let x0 = pad.width, y0 = pad.height, x1 = -1, y1 = -1;
    for (let y = 0; y < pad.height; y++) {
      for (let x = 0; x < pad.width; x++) {
        if (src[(y * pad.width + x) * 4] > 10) {
          if (x < x0) x0 = x;
          if (x > x1) x1 = x;
          if (y < y0) y0 = y;
          if (y > y1) y1 = y;
        }
      }
    }
    if (x1 < 0) return null;
    const bw = x1 - x0 + 1, bh = y1 - y0 + 1;
    const s = Math.min((W * fit) / bw, (H * fit) / bh);
    const tw = Math.max(1, Math.round(bw * s)), th = Math.max(1, Math.round(bh * s));
    // shrink in halving steps: one big step with smoothing would drop thin strokes
    let from = document.createElement("canvas");
    from.width = bw; from.height = bh;
    from.getContext("2d").drawImage(pad, x0, y0, bw, bh, 0, 0, bw, bh);
    while (from.width / 2 > tw && from.height / 2 > th) {
      const half = document.createElement("canvas");
      half.width = Math.ceil(from.width / 2); half.height = Math.ceil(from.height / 2);
      const hc = half.getContext("2d");
      hc.imageSmoothingQuality = "high";
      hc.drawImage(from, 0, 0, half.width, half.height);
      from = half;
    }
    const small = document.createElement("canvas");
    small.width = tw; small.height = th;
    const sc = small.getContext("2d", { willReadFrequently: true });
    sc.imageSmoothingQuality = "high";
    sc.drawImage(from, 0, 0, tw, th);
    const sd = sc.getImageData(0, 0, tw, th).data;
    const g = new Float32Array(tw * th);
    let m = 0, mx = 0, my = 0;
    for (let y = 0; y < th; y++) {
      for (let x = 0; x < tw; x++) {
        const v = sd[(y * tw + x) * 4] / 255;
        g[y * tw + x] = v;
        m += v; mx += v * (x + 0.5); my += v * (y + 0.5);
      }
    }
    let ox, oy;
    if (center === "mass" && m > 0) {
      ox = Math.round(W / 2 - mx / m);
      oy = Math.round(H / 2 - my / m);
    } else {
      ox = Math.floor((W - tw) / 2);
      oy = Math.floor((H - th) / 2);
    }
    const out = new Float32Array(H * W);
    for (let y = 0; y < th; y++) {
      for (let x = 0; x < tw; x++) {
        const X = x + ox, Y = y + oy;
        if (X >= 0 && X < W && Y >= 0 && Y < H) out[Y * W + X] = g[y * tw + x];
      }
    }
    return out;
  }

  function showInput(plane) {
    const [, H, W] = info.input_dim;
    const c = $("input");
    c.width = W; c.height = H;
    const im = c.getContext("2d").createImageData(W, H);
    for (let i = 0; i < H * W; i++) {
      const v = Math.round(plane[i] * 255);
      im.data.set([v, v, v, 255], i * 4);
    }
    c.getContext("2d").putImageData(im, 0, 0);
    $("input-size").textContent = `(${W}x${H})`;
  }

  // A .npy file (version 1.0, little-endian float32) of the given shape.
  function npy(values, shape) {
    let header = `{'descr': '<f4', 'fortran_order': False, 'shape': (${shape.join(", ")}${shape.length === 1 ? "," : ""}), }`;
    header += " ".repeat((64 - ((10 + header.length + 1) % 64)) % 64) + "\n";
    const out = new Uint8Array(10 + header.length + values.byteLength);
    out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0, header.length & 255, header.length >> 8]);
    for (let i = 0; i < header.length; i++) out[10 + i] = header.charCodeAt(i);
    out.set(new Uint8Array(values.buffer, values.byteOffset, values.byteLength), 10 + header.length);
    return out;
  }

  // ------------------------------------------------------------------ asking the server

  async function post(body, type, tag) {
    const r = await fetch("/api/predict?features=1", { method: "POST", headers: { "Content-Type": type }, body });
    const answer = await r.json();
    if (!r.ok) throw new Error(answer.error || `HTTP ${r.status}`);
    show(answer, tag);
  }

  async function predictDrawing() {
    if (!info || !info.model) return;
    if (inFlight) { pending = true; return; }
    const plane = toInput();
    if (plane === null) return;
    const [C, H, W] = info.input_dim;
    showInput(plane);
    const values = new Float32Array(C * H * W);
    for (let c = 0; c < C; c++) values.set(plane, c * H * W);
    inFlight = true;
    lastSent = performance.now();
    const tag = strokes;
    try {
      await post(npy(values, [C, H, W]), "application/x-npy", tag);
      say(`${info.model} from ${info.checkpoint}: input ${C}x${H}x${W}`);
    } catch (err) {
      say(`predict failed: ${err.message}`, true);
    } finally {
      inFlight = false;
      if (pending) { pending = false; predictDrawing(); }
    }
  }

  async function predictFile(file) {
    if (!info || !info.model) return;
    let type = file.type;
    if (/\.npy$/i.test(file.name)) type = "application/x-npy";
    try {
      blank();
      await post(file, type || "application/octet-stream", -1);
      say(`${file.name}: read as the model's ${info.input_dim.join("x")} input`);
    } catch (err) {
      say(`${file.name}: ${err.message}`, true);
    }
  }

  // ------------------------------------------------------------------ showing the answer

  function drawBars(p) {
    const svg = $("bars");
    svg.replaceChildren();
    const n = p ? p.length : (info && info.class_names ? info.class_names.length : 10);
    const w = 420, h = 220, top = 18, bottom = 22;
    const slot = w / n;
    const best = p ? p.indexOf(Math.max(...p)) : -1;
    for (let k = 0; k < n; k++) {
      const v = p ? p[k] : 0;
      const bh = v * (h - top - bottom);
      const rect = document.createElementNS(SVG, "rect");
      rect.setAttribute("x", k * slot + slot * 0.15);
      rect.setAttribute("y", h - bottom - bh);
      rect.setAttribute("width", slot * 0.7);
      rect.setAttribute("height", Math.max(bh, 0));
      rect.dataset.class = k;
      rect.dataset.p = v;
      if (k === best) rect.classList.add("top");
      svg.append(rect);
      const label = document.createElementNS(SVG, "text");
      label.setAttribute("x", k * slot + slot / 2);
      label.setAttribute("y", h - 6);
      label.textContent = info && info.class_names && info.class_names[k] !== undefined ? info.class_names[k] : k;
      svg.append(label);
      if (p && v >= 0.01) {
        const t = document.createElementNS(SVG, "text");
        t.setAttribute("x", k * slot + slot / 2);
        t.setAttribute("y", h - bottom - bh - 4);
        t.textContent = v.toFixed(2);
        svg.append(t);
      }
    }
  }

  function drawMaps(f) {
    const box = $("maps");
    box.replaceChildren();
    if (!f) return;
    $("maps-name").textContent = `${f.layer}: ${f.shape[0]} maps of ${f.shape[2]}x${f.shape[1]}`;
    const bytes = Uint8Array.from(atob(f.data), (ch) => ch.charCodeAt(0));
    const [K, h, w] = f.shape;
    for (let k = 0; k < K; k++) {
      const c = document.createElement("canvas");
      c.width = w; c.height = h;
      c.title = `map ${k} (peak ${f.peak[k].toFixed(3)})`;
      const im = c.getContext("2d").createImageData(w, h);
      for (let i = 0; i < h * w; i++) {
        const v = bytes[k * h * w + i];
        im.data.set([v, v, v, 255], i * 4);
      }
      c.getContext("2d").putImageData(im, 0, 0);
      box.append(c);
    }
  }

  function show(answer, tag) {
    const k = answer.class;
    const name = answer.name !== undefined ? answer.name : String(k);
    predicted.textContent = name;
    predicted.dataset.class = String(k);
    if (tag >= 0) predicted.dataset.strokes = String(tag);
    $("confidence").textContent = `(probability ${answer.probabilities[k].toFixed(3)})`;
    drawBars(answer.probabilities);
    drawMaps(answer.features);
  }

  // ------------------------------------------------------------------ files

  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) predictFile(e.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", (e) => { if (e.target.files.length) predictFile(e.target.files[0]); });

  // ------------------------------------------------------------------ start

  reset();
  fetch("/api/model").then((r) => r.json()).then((m) => {
    info = m;
    if (!m.model) {
      say("no checkpoint loaded: start the server as 'xpconv serve CKPT' to draw for a model", true);
      return;
    }
    drawBars(null);
    say(`${m.model} from ${m.checkpoint}: input ${m.input_dim.join("x")}; draw a digit`);
    document.body.dataset.ready = "1";
  }).catch((err) => say(`cannot read /api/model: ${err.message}`, true));
})();
