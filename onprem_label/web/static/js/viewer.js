// The image canvas: frames rendered by the server (window/level applied there), zoom, pan, fit and 1:1.
// Image coordinates map to the screen as screen = image * scale + offset (CSS pixels).

export const PRESETS = [
  { key: "1", name: "lung", label: "Lung", center: -600, width: 1500 },
  { key: "2", name: "mediastinum", label: "Mediastinum", center: 40, width: 400 },
  { key: "3", name: "bone", label: "Bone", center: 400, width: 1800 },
  { key: "4", name: "brain", label: "Brain", center: 40, width: 80 },
  { key: "5", name: "abdomen", label: "Abdomen", center: 40, width: 350 },
];
const ZOOM_STEP = Math.SQRT2;
const MIN_SCALE = 1 / 32, MAX_SCALE = 64;
const PREFETCH = 3; // frames on each side kept loading ahead
const CACHE_LIMIT = 160;

export class Viewer {
  constructor(canvas, { onView, onPaint } = {}) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.onView = onView || (() => {});
    this.onPaint = onPaint || (() => {});
    this.item = null;
    this.frame = 0;
    this.window = null; // null: the file's own window; {preset} or {center, width}
    this.scale = 1;
    this.tx = 0;
    this.ty = 0;
    this.cache = new Map(); // url -> {img, ready}
    this.current = null; // the image on screen
    this.overlay = () => {};
    this.wlTimer = null;
    new ResizeObserver(() => this.resize()).observe(canvas);
    this.resize();
  }

  // --- what is shown ---------------------------------------------------------------------------------

  setItem(item) {
    this.item = item;
    this.frame = 0;
    this.cache.clear();
    this.current = null;
    const meta = (item.images[0] && item.images[0].meta) || {};
    this.grey = item.kind === "dicom" && ["MONOCHROME1", "MONOCHROME2"].includes(meta.photometric);
    this.defaultWindow = meta.window || null;
    this.window = null;
    this.fit();
    this.show();
  }

  get width() { return this.item ? this.item.width : 1; }
  get height() { return this.item ? this.item.height : 1; }
  get frames() { return this.item ? this.item.frames : 1; }

  setFrame(frame) {
    if (!this.item) return;
    const next = Math.max(0, Math.min(this.frames - 1, frame));
    if (next === this.frame && this.current) return;
    this.frame = next;
    this.show();
  }

  setWindow(window, { immediate = true } = {}) {
    this.window = window;
    this.onView();
    if (immediate) {
      this.show();
      return;
    }
    // While dragging: show the readout at once, ask the server at most every 120 ms.
    clearTimeout(this.wlTimer);
    this.wlTimer = setTimeout(() => this.show(), 120);
  }

  windowText() {
    if (!this.grey) return "n/a";
    const w = this.window;
    if (w && w.preset) {
      const p = PRESETS.find((x) => x.name === w.preset);
      return `${p.label} ${p.width}/${p.center}`;
    }
    const v = w || this.defaultWindow;
    return v ? `${Math.round(v.width)}/${Math.round(v.center)}` : "auto";
  }

  // The window in effect as numbers (for dragging from it).
  windowNumbers() {
    const w = this.window;
    if (w && w.preset) {
      const p = PRESETS.find((x) => x.name === w.preset);
      return { center: p.center, width: p.width };
    }
    return w || this.defaultWindow || { center: 40, width: 400 };
  }

  url(frame, window = this.window) {
    let q = `frame=${frame}`;
    if (this.grey && window) {
      q += window.preset ? `&preset=${window.preset}`
        : `&level=${Math.round(window.center)}&window=${Math.max(1, Math.round(window.width))}`;
    }
    return `/api/v1/items/${this.item.id}/image?${q}`;
  }

  load(url) {
    let entry = this.cache.get(url);
    if (!entry) {
      const img = new Image();
      entry = { img, ready: false, failed: false };
      entry.promise = new Promise((resolve) => {
        img.onload = () => { entry.ready = true; resolve(entry); };
        img.onerror = () => { entry.failed = true; resolve(entry); };
      });
      img.src = url;
      this.cache.set(url, entry);
      if (this.cache.size > CACHE_LIMIT) this.cache.delete(this.cache.keys().next().value);
    }
    return entry;
  }

  show() {
    if (!this.item) return;
    const frame = this.frame, url = this.url(frame);
    const entry = this.load(url);
    const paint = () => {
      if (this.frame !== frame || this.url(this.frame) !== url) return; // moved on meanwhile
      if (entry.failed) {
        this.onPaint({ frame, failed: true });
        return;
      }
      this.current = entry.img;
      this.draw();
      this.onPaint({ frame });
    };
    if (entry.ready || entry.failed) paint();
    else entry.promise.then(paint);
    for (let d = 1; d <= PREFETCH; d++) {
      for (const f of [frame + d, frame - d]) if (f >= 0 && f < this.frames) this.load(this.url(f));
    }
    this.onView();
  }

  // --- the transform ---------------------------------------------------------------------------------

  resize() {
    const dpr = window.devicePixelRatio || 1;
    const { width, height } = this.canvas.getBoundingClientRect();
    this.cssWidth = width;
    this.cssHeight = height;
    this.canvas.width = Math.max(1, Math.round(width * dpr));
    this.canvas.height = Math.max(1, Math.round(height * dpr));
    if (this.fitted) this.fit(); else this.draw();
  }

  fit() {
    if (!this.item || !this.cssWidth) return;
    this.scale = Math.min(this.cssWidth / this.width, this.cssHeight / this.height) * 0.96;
    this.center();
    this.fitted = true;
  }

  oneToOne() {
    this.zoomTo(1, this.cssWidth / 2, this.cssHeight / 2);
    this.center();
  }

  center() {
    this.tx = (this.cssWidth - this.width * this.scale) / 2;
    this.ty = (this.cssHeight - this.height * this.scale) / 2;
    this.changed();
  }

  zoomBy(steps, sx = this.cssWidth / 2, sy = this.cssHeight / 2) {
    let target = this.scale * ZOOM_STEP ** steps;
    const snapped = 2 ** (Math.round(Math.log2(target) * 2) / 2); // powers of sqrt(2): 1, 2 exactly
    if (Math.abs(snapped - target) / target < 1e-6) target = snapped;
    this.zoomTo(target, sx, sy);
  }

  zoomTo(scale, sx, sy) {
    const s = Math.max(MIN_SCALE, Math.min(MAX_SCALE, scale));
    const [ix, iy] = this.toImage(sx, sy);
    this.scale = s;
    this.tx = sx - ix * s;
    this.ty = sy - iy * s;
    this.changed();
  }

  panBy(dx, dy) {
    this.tx += dx;
    this.ty += dy;
    this.changed();
  }

  changed() {
    this.fitted = false;
    this.canvas.dataset.scale = String(this.scale);
    this.canvas.dataset.tx = String(this.tx);
    this.canvas.dataset.ty = String(this.ty);
    this.draw();
    this.onView();
  }

  toImage(sx, sy) {
    return [(sx - this.tx) / this.scale, (sy - this.ty) / this.scale];
  }

  toScreen(ix, iy) {
    return [ix * this.scale + this.tx, iy * this.scale + this.ty];
  }

  // --- painting --------------------------------------------------------------------------------------

  setOverlay(fn) {
    this.overlay = fn;
  }

  draw() {
    const ctx = this.ctx, dpr = window.devicePixelRatio || 1;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#111";
    ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
    if (!this.item) return;
    ctx.setTransform(dpr * this.scale, 0, 0, dpr * this.scale, dpr * this.tx, dpr * this.ty);
    ctx.imageSmoothingEnabled = this.scale < 1; // enlarged pixels stay sharp squares
    if (this.current) ctx.drawImage(this.current, 0, 0, this.width, this.height);
    this.overlay(ctx, this);
  }
}
