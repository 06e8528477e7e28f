// The shapes of one task and the tools that draw and edit them; undo/redo over whole-annotation snapshots.

import {
  boxFrom, clone, decodeRle, encodeRle, handles, hitTest, maskBounds, moved, newId, paintDisc, round2, withHandle,
} from "./geometry.js";

export const TOOLS = [
  { id: "select", key: "v", label: "Select / move", help: "select, move, resize, edit vertices" },
  { id: "bbox", key: "b", label: "Box", help: "drag to draw a box" },
  { id: "polygon", key: "g", label: "Polygon", help: "click each corner; click the first point or Enter to close" },
  { id: "polyline", key: "l", label: "Polyline", help: "click each point; Enter or double-click to finish" },
  { id: "point", key: "t", label: "Point", help: "click to place a point" },
  { id: "mask", key: "m", label: "Brush", help: "paint a mask; [ and ] change the size" },
  { id: "eraser", key: "e", label: "Eraser", help: "erase from the class's mask" },
];
const HISTORY_LIMIT = 200;
const CLOSE_PX = 8; // screen pixels within which a click closes a polygon or grabs a handle
const HANDLE_PX = 4;

export class Editor {
  constructor(viewer, { onChange, onSelect } = {}) {
    this.viewer = viewer;
    this.onChange = onChange || (() => {});
    this.onSelect = onSelect || (() => {});
    this.classes = [];
    this.shapes = [];
    this.previous = null; // shapes of an earlier revision, drawn for comparison (review)
    this.pins = []; // [{shapeId, number}] reviewer comments pinned on shapes
    this.selectedId = null;
    this.tool = "bbox";
    this.cls = null;
    this.brush = 12;
    this.hidden = false;
    this.readOnly = false;
    this.drawing = null; // the shape being drawn
    this.drag = null; // {kind: "move"|"handle"|"paint", ...}
    this.undoStack = [];
    this.redoStack = [];
    this.masks = new Map(); // shape id -> {bits, canvas, color}
  }

  setClasses(classes) {
    this.classes = classes;
    if (!this.cls && classes.length) this.cls = classes[0].name;
  }

  classOf(name) {
    return this.classes.find((c) => c.name === name);
  }

  allowed(tool, clsName = this.cls) {
    if (tool === "select") return true;
    const cls = this.classOf(clsName);
    return !!cls && cls.tools.includes(tool === "eraser" ? "mask" : tool);
  }

  load(shapes) {
    this.shapes = clone(shapes || []).map((s) => (s.id ? s : { ...s, id: newId() }));
    this.masks.clear();
    this.selectedId = null;
    this.drawing = null;
    this.drag = null;
    this.undoStack = [];
    this.redoStack = [];
    this.redraw();
  }

  snapshot() {
    return JSON.stringify(this.shapes);
  }

  // Replace the shapes as one undoable step.
  commit(shapes) {
    this.undoStack.push(this.snapshot());
    if (this.undoStack.length > HISTORY_LIMIT) this.undoStack.shift();
    this.redoStack = [];
    this.shapes = shapes;
    this.afterChange();
  }

  undo() {
    if (!this.undoStack.length || this.readOnly) return;
    this.redoStack.push(this.snapshot());
    this.shapes = JSON.parse(this.undoStack.pop());
    this.afterChange();
  }

  redo() {
    if (!this.redoStack.length || this.readOnly) return;
    this.undoStack.push(this.snapshot());
    this.shapes = JSON.parse(this.redoStack.pop());
    this.afterChange();
  }

  afterChange() {
    this.masks.clear();
    if (this.selectedId && !this.shapes.some((s) => s.id === this.selectedId)) this.selectedId = null;
    this.onChange();
    this.onSelect(this.selectedId);
    this.redraw();
  }

  select(id) {
    this.selectedId = id;
    const shape = this.shapes.find((s) => s.id === id);
    if (shape && shape.frame !== this.viewer.frame) this.viewer.setFrame(shape.frame);
    this.onSelect(id);
    this.redraw();
  }

  deleteSelected() {
    if (!this.selectedId || this.readOnly) return;
    this.commit(this.shapes.filter((s) => s.id !== this.selectedId));
  }

  relabelSelected(name) {
    const shape = this.shapes.find((s) => s.id === this.selectedId);
    if (!shape || this.readOnly || !this.allowed(shape.type, name)) return false;
    this.commit(this.shapes.map((s) => (s.id === shape.id ? { ...s, label: name } : s)));
    return true;
  }

  redraw() {
    this.viewer.draw();
  }

  // --- pointer input (image coordinates; the workspace routes pan and window/level elsewhere) -------

  tolerance(px) {
    return px / this.viewer.scale;
  }

  pointerDown(x, y) {
    if (this.readOnly) return;
    const w = this.viewer.width, h = this.viewer.height, frame = this.viewer.frame;
    if (x < 0 || y < 0 || x > w || y > h) {
      if (this.tool !== "select") return;
    }
    const tool = this.tool;
    if (tool !== "select" && !this.allowed(tool)) return;
    if (tool === "select") return this.startSelect(x, y);
    if (tool === "bbox") {
      this.drawing = { type: "bbox", x0: x, y0: y, x1: x, y1: y };
    } else if (tool === "point") {
      this.add({ type: "point", x: round2(x), y: round2(y) });
    } else if (tool === "polygon" || tool === "polyline") {
      this.addVertex(tool, x, y);
    } else if (tool === "mask" || tool === "eraser") {
      this.startPaint(x, y, tool === "mask" ? 1 : 0, frame);
    }
    this.redraw();
  }

  pointerMove(x, y) {
    const w = this.viewer.width, h = this.viewer.height;
    if (this.drawing && this.drawing.type === "bbox") {
      this.drawing.x1 = x;
      this.drawing.y1 = y;
    } else if (this.drawing && this.drawing.points) {
      this.drawing.hover = [round2(Math.min(w, Math.max(0, x))), round2(Math.min(h, Math.max(0, y)))];
    } else if (this.drag && this.drag.kind === "move") {
      this.drag.preview = moved(this.drag.start, x - this.drag.x, y - this.drag.y, w, h);
    } else if (this.drag && this.drag.kind === "handle") {
      this.drag.preview = withHandle(this.drag.start, this.drag.index, x, y, w, h);
    } else if (this.drag && this.drag.kind === "paint") {
      this.paintTo(x, y);
    } else {
      return;
    }
    this.redraw();
  }

  pointerUp(x, y) {
    if (this.drawing && this.drawing.type === "bbox") {
      const d = this.drawing;
      this.drawing = null;
      const box = boxFrom(d.x0, d.y0, x, y, this.viewer.width, this.viewer.height);
      if (box.width * this.viewer.scale >= 2 && box.height * this.viewer.scale >= 2) this.add({ type: "bbox", ...box });
    } else if (this.drag && (this.drag.kind === "move" || this.drag.kind === "handle")) {
      const { preview, start } = this.drag;
      this.drag = null;
      if (preview && JSON.stringify(preview) !== JSON.stringify(start)) {
        this.commit(this.shapes.map((s) => (s.id === start.id ? preview : s)));
      }
    } else if (this.drag && this.drag.kind === "paint") {
      this.endPaint();
    }
    this.redraw();
  }

  doubleClick() {
    if (this.drawing && this.drawing.points) this.finishDrawing();
  }

  add(geometry) {
    const shape = { id: newId(), label: this.cls, frame: this.viewer.frame, ...geometry };
    this.selectedId = shape.id;
    this.commit([...this.shapes, shape]);
  }

  addVertex(tool, x, y) {
    const w = this.viewer.width, h = this.viewer.height;
    const p = [round2(Math.min(w, Math.max(0, x))), round2(Math.min(h, Math.max(0, y)))];
    if (!this.drawing) {
      this.drawing = { type: tool, points: [p], hover: p };
      return;
    }
    const pts = this.drawing.points;
    const first = pts[0], last = pts[pts.length - 1];
    const near = (a) => Math.hypot(a[0] - p[0], a[1] - p[1]) <= this.tolerance(CLOSE_PX);
    if (tool === "polygon" && pts.length >= 3 && near(first)) return this.finishDrawing();
    if (near(last)) return; // a double click's second click
    pts.push(p);
  }

  finishDrawing() {
    const d = this.drawing;
    if (!d || !d.points) return;
    const min = d.type === "polygon" ? 3 : 2;
    this.drawing = null;
    if (d.points.length >= min) this.add({ type: d.type, points: d.points });
    this.redraw();
  }

  cancelDrawing() {
    const busy = !!(this.drawing || this.drag);
    this.drawing = null;
    if (this.drag && this.drag.kind === "paint") this.masks.clear();
    this.drag = null;
    if (!busy) this.select(null);
    this.redraw();
  }

  removeLastVertex() {
    if (!this.drawing || !this.drawing.points) return false;
    this.drawing.points.pop();
    if (!this.drawing.points.length) this.drawing = null;
    this.redraw();
    return true;
  }

  visibleShapes() {
    return this.shapes.filter((s) => s.frame === this.viewer.frame);
  }

  startSelect(x, y) {
    const tol = this.tolerance(HANDLE_PX + 2);
    const selected = this.shapes.find((s) => s.id === this.selectedId);
    if (selected && selected.frame === this.viewer.frame) {
      const hit = hitTest(selected, x, y, tol, (s, px, py) => this.maskAt(s, px, py));
      if (hit && hit.handle !== undefined && selected.type !== "mask") {
        this.drag = { kind: "handle", index: hit.handle, start: clone(selected), x, y };
        return;
      }
    }
    const shapes = this.visibleShapes();
    for (let i = shapes.length - 1; i >= 0; i--) {
      const hit = hitTest(shapes[i], x, y, tol, (s, px, py) => this.maskAt(s, px, py));
      if (hit) {
        this.selectedId = shapes[i].id;
        this.onSelect(this.selectedId);
        if (shapes[i].type !== "mask") this.drag = { kind: "move", start: clone(shapes[i]), x, y };
        return;
      }
    }
    this.selectedId = null;
    this.onSelect(null);
  }

  // --- masks ---------------------------------------------------------------------------------------

  maskLayer(shape) {
    let layer = this.masks.get(shape.id);
    if (!layer) {
      const w = this.viewer.width, h = this.viewer.height;
      const bits = shape.rle ? decodeRle(shape.rle) : new Uint8Array(w * h);
      const canvas = document.createElement("canvas");
      canvas.width = w;
      canvas.height = h;
      layer = { bits, canvas, color: (this.classOf(shape.label) || {}).color || "#ff0000" };
      this.masks.set(shape.id, layer);
      this.paintLayer(layer, { x0: 0, y0: 0, x1: w, y1: h });
    }
    return layer;
  }

  paintLayer(layer, rect) {
    const w = this.viewer.width;
    const rw = rect.x1 - rect.x0, rh = rect.y1 - rect.y0;
    if (rw <= 0 || rh <= 0) return;
    const ctx = layer.canvas.getContext("2d");
    const data = ctx.createImageData(rw, rh);
    const c = layer.color;
    const r = parseInt(c.slice(1, 3), 16), g = parseInt(c.slice(3, 5), 16), b = parseInt(c.slice(5, 7), 16);
    for (let y = 0; y < rh; y++) {
      for (let x = 0; x < rw; x++) {
        if (layer.bits[(rect.y0 + y) * w + rect.x0 + x]) {
          const o = (y * rw + x) * 4;
          data.data[o] = r;
          data.data[o + 1] = g;
          data.data[o + 2] = b;
          data.data[o + 3] = 115;
        }
      }
    }
    ctx.putImageData(data, rect.x0, rect.y0);
  }

  maskAt(shape, x, y) {
    const layer = this.maskLayer(shape);
    const w = this.viewer.width;
    const xi = Math.floor(x), yi = Math.floor(y);
    return xi >= 0 && yi >= 0 && xi < w && yi < this.viewer.height && layer.bits[yi * w + xi] === 1;
  }

  startPaint(x, y, value, frame) {
    let shape = this.shapes.find((s) => s.type === "mask" && s.label === this.cls && s.frame === frame);
    const creating = !shape;
    if (creating && value === 0) return; // nothing to erase
    if (creating) {
      const w = this.viewer.width, h = this.viewer.height;
      shape = { id: newId(), type: "mask", label: this.cls, frame, rle: { size: [h, w], counts: [w * h] } };
    }
    this.drag = { kind: "paint", value, shape, creating, last: [x, y] };
    this.maskLayer(shape);
    this.paintTo(x, y);
  }

  paintTo(x, y) {
    const d = this.drag, layer = this.maskLayer(d.shape);
    const w = this.viewer.width, h = this.viewer.height, r = this.brush / 2;
    const [lx, ly] = d.last;
    const steps = Math.max(1, Math.ceil(Math.hypot(x - lx, y - ly) / Math.max(1, r / 2)));
    for (let i = 1; i <= steps; i++) {
      const px = lx + ((x - lx) * i) / steps, py = ly + ((y - ly) * i) / steps;
      this.paintLayer(layer, paintDisc(layer.bits, w, h, px, py, r, d.value));
    }
    if (steps === 1 && lx === x && ly === y) this.paintLayer(layer, paintDisc(layer.bits, w, h, x, y, r, d.value));
    d.last = [x, y];
  }

  endPaint() {
    const d = this.drag;
    this.drag = null;
    const layer = this.masks.get(d.shape.id);
    const w = this.viewer.width, h = this.viewer.height;
    const empty = !maskBounds(layer.bits, w, h);
    const updated = { ...d.shape, rle: encodeRle(layer.bits, w, h) };
    let shapes;
    if (empty) shapes = this.shapes.filter((s) => s.id !== d.shape.id);
    else if (d.creating) shapes = [...this.shapes, updated];
    else shapes = this.shapes.map((s) => (s.id === updated.id ? updated : s));
    this.selectedId = empty ? null : updated.id;
    this.commit(shapes);
  }

  // --- painting the overlay --------------------------------------------------------------------------

  drawOverlay(ctx, viewer) {
    if (this.hidden) return;
    const px = 1 / viewer.scale; // one screen pixel in image units
    if (this.previous) {
      for (const s of this.previous.filter((p) => p.frame === viewer.frame)) {
        this.drawShape(ctx, s, "#ffd400", px, { dashed: true });
      }
    }
    for (const s of this.visibleShapes()) {
      const shown = this.drag && this.drag.preview && this.drag.start.id === s.id ? this.drag.preview : s;
      const color = (this.classOf(s.label) || {}).color || "#ff0000";
      this.drawShape(ctx, shown, color, px, { selected: s.id === this.selectedId });
    }
    if (this.drag && this.drag.kind === "paint" && this.drag.creating) {
      ctx.drawImage(this.maskLayer(this.drag.shape).canvas, 0, 0);
    }
    if (this.drawing) this.drawDrawing(ctx, px);
    this.drawPins(ctx, px);
  }

  drawShape(ctx, s, color, px, { selected = false, dashed = false } = {}) {
    ctx.save();
    ctx.strokeStyle = color;
    ctx.fillStyle = color;
    ctx.lineWidth = (selected ? 3 : 2) * px;
    if (dashed) ctx.setLineDash([6 * px, 4 * px]);
    if (s.type === "bbox") {
      ctx.strokeRect(s.x, s.y, s.width, s.height);
    } else if (s.type === "point") {
      ctx.beginPath();
      ctx.arc(s.x, s.y, 4 * px, 0, Math.PI * 2);
      ctx.fill();
    } else if (s.points) {
      ctx.beginPath();
      s.points.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      if (s.type === "polygon") {
        ctx.closePath();
        ctx.globalAlpha = 0.15;
        ctx.fill();
        ctx.globalAlpha = 1;
      }
      ctx.stroke();
    } else if (s.type === "mask" && !dashed) {
      ctx.drawImage(this.maskLayer(s).canvas, 0, 0);
    }
    if (selected && s.type !== "mask") {
      ctx.setLineDash([]);
      ctx.fillStyle = "#fff";
      ctx.strokeStyle = "#000";
      ctx.lineWidth = px;
      for (const [x, y] of handles(s)) {
        ctx.fillRect(x - HANDLE_PX * px, y - HANDLE_PX * px, 2 * HANDLE_PX * px, 2 * HANDLE_PX * px);
        ctx.strokeRect(x - HANDLE_PX * px, y - HANDLE_PX * px, 2 * HANDLE_PX * px, 2 * HANDLE_PX * px);
      }
    }
    ctx.restore();
  }

  drawDrawing(ctx, px) {
    const d = this.drawing, color = (this.classOf(this.cls) || {}).color || "#fff";
    ctx.save();
    ctx.strokeStyle = color;
    ctx.lineWidth = 2 * px;
    ctx.setLineDash([4 * px, 3 * px]);
    if (d.type === "bbox") {
      const b = boxFrom(d.x0, d.y0, d.x1, d.y1, this.viewer.width, this.viewer.height);
      ctx.strokeRect(b.x, b.y, b.width, b.height);
    } else {
      const pts = [...d.points, d.hover];
      ctx.beginPath();
      pts.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      ctx.stroke();
      ctx.fillStyle = color;
      for (const [x, y] of d.points) ctx.fillRect(x - 3 * px, y - 3 * px, 6 * px, 6 * px);
    }
    ctx.restore();
  }

  drawPins(ctx, px) {
    for (const pin of this.pins) {
      const s = this.shapes.find((x) => x.id === pin.shapeId && x.frame === this.viewer.frame);
      if (!s) continue;
      const h = handles(s);
      const [x, y] = h.length ? h[0] : [0, 0];
      ctx.save();
      ctx.fillStyle = "#a3231d";
      ctx.beginPath();
      ctx.arc(x, y - 12 * px, 9 * px, 0, Math.PI * 2);
      ctx.fill();
      ctx.fillStyle = "#fff";
      ctx.font = `${12 * px}px system-ui, sans-serif`;
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText(String(pin.number), x, y - 12 * px);
      ctx.restore();
    }
  }
}
