// Shapes in image pixel coordinates (DESIGN.md): hit tests, moves, handles, and COCO RLE for masks.

export const round2 = (v) => Math.round(v * 100) / 100;
export const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));

let counter = 0;
export function newId() {
  counter += 1;
  return `s${Date.now().toString(36)}${counter.toString(36)}${Math.floor(Math.random() * 1e6).toString(36)}`;
}

export function clone(value) {
  return JSON.parse(JSON.stringify(value));
}

// A box from two corners, inside a W x H image.
export function boxFrom(x0, y0, x1, y1, w, h) {
  const ax = clamp(Math.min(x0, x1), 0, w), bx = clamp(Math.max(x0, x1), 0, w);
  const ay = clamp(Math.min(y0, y1), 0, h), by = clamp(Math.max(y0, y1), 0, h);
  return { x: round2(ax), y: round2(ay), width: round2(bx - ax), height: round2(by - ay) };
}

export function bounds(shape) {
  if (shape.type === "bbox") return { x0: shape.x, y0: shape.y, x1: shape.x + shape.width, y1: shape.y + shape.height };
  if (shape.type === "point") return { x0: shape.x, y0: shape.y, x1: shape.x, y1: shape.y };
  if (shape.points) {
    const xs = shape.points.map((p) => p[0]), ys = shape.points.map((p) => p[1]);
    return { x0: Math.min(...xs), y0: Math.min(...ys), x1: Math.max(...xs), y1: Math.max(...ys) };
  }
  if (shape.type === "mask" && shape.bbox) return shape.bbox;
  return null;
}

// The handles a selected shape offers, as [x, y] in image coordinates.
export function handles(shape) {
  if (shape.type === "bbox") {
    const { x, y, width: w, height: h } = shape;
    return [[x, y], [x + w / 2, y], [x + w, y], [x + w, y + h / 2], [x + w, y + h], [x + w / 2, y + h], [x, y + h], [x, y + h / 2]];
  }
  if (shape.type === "point") return [[shape.x, shape.y]];
  if (shape.points) return shape.points;
  return [];
}

function distToSegment(px, py, ax, ay, bx, by) {
  const dx = bx - ax, dy = by - ay;
  const len = dx * dx + dy * dy;
  const t = len ? clamp(((px - ax) * dx + (py - ay) * dy) / len, 0, 1) : 0;
  return Math.hypot(px - (ax + t * dx), py - (ay + t * dy));
}

function insidePolygon(x, y, points) {
  let inside = false;
  for (let i = 0, j = points.length - 1; i < points.length; j = i++) {
    const [xi, yi] = points[i], [xj, yj] = points[j];
    if ((yi > y) !== (yj > y) && x < ((xj - xi) * (y - yi)) / (yj - yi) + xi) inside = !inside;
  }
  return inside;
}

// What of `shape` lies under (x, y): {handle: i} or {body: true} or null; tol in image pixels.
export function hitTest(shape, x, y, tol, maskAt) {
  const hs = handles(shape);
  for (let i = 0; i < hs.length; i++) {
    if (Math.hypot(hs[i][0] - x, hs[i][1] - y) <= tol) return { handle: i };
  }
  if (shape.type === "bbox") {
    const inX = x >= shape.x - tol && x <= shape.x + shape.width + tol;
    const inY = y >= shape.y - tol && y <= shape.y + shape.height + tol;
    return inX && inY ? { body: true } : null;
  }
  if (shape.type === "polygon") {
    if (insidePolygon(x, y, shape.points)) return { body: true };
  }
  if (shape.points) {
    const n = shape.points.length, closed = shape.type === "polygon";
    for (let i = 0; i < n - (closed ? 0 : 1); i++) {
      const a = shape.points[i], b = shape.points[(i + 1) % n];
      if (distToSegment(x, y, a[0], a[1], b[0], b[1]) <= tol) return { body: true };
    }
  }
  if (shape.type === "mask" && maskAt && maskAt(shape, x, y)) return { body: true };
  return null;
}

// Move a shape by (dx, dy), kept inside the image.
export function moved(shape, dx, dy, w, h) {
  const out = clone(shape);
  const b = bounds(shape);
  if (!b) return out;
  const mx = clamp(dx, -b.x0, w - b.x1), my = clamp(dy, -b.y0, h - b.y1);
  if (out.type === "bbox" || out.type === "point") {
    out.x = round2(out.x + mx);
    out.y = round2(out.y + my);
  } else if (out.points) {
    out.points = out.points.map(([px, py]) => [round2(px + mx), round2(py + my)]);
  }
  return out;
}

// A shape with handle `index` dragged to (x, y).
export function withHandle(shape, index, x, y, w, h) {
  const out = clone(shape);
  x = round2(clamp(x, 0, w));
  y = round2(clamp(y, 0, h));
  if (out.type === "point") {
    out.x = x;
    out.y = y;
  } else if (out.points) {
    out.points[index] = [x, y];
  } else if (out.type === "bbox") {
    let x0 = shape.x, y0 = shape.y, x1 = shape.x + shape.width, y1 = shape.y + shape.height;
    if ([0, 6, 7].includes(index)) x0 = x;
    if ([2, 3, 4].includes(index)) x1 = x;
    if ([0, 1, 2].includes(index)) y0 = y;
    if ([4, 5, 6].includes(index)) y1 = y;
    Object.assign(out, boxFrom(x0, y0, x1, y1, w, h));
  }
  return out;
}

// --- masks: COCO uncompressed RLE, column-major (Fortran order), runs starting with zeros --------------

export function encodeRle(bits, w, h) {
  const counts = [];
  let current = 0, run = 0;
  for (let x = 0; x < w; x++) {
    for (let y = 0; y < h; y++) {
      const v = bits[y * w + x] ? 1 : 0;
      if (v !== current) {
        counts.push(run);
        run = 0;
        current = v;
      }
      run += 1;
    }
  }
  counts.push(run);
  return { size: [h, w], counts };
}

export function decodeRle(rle) {
  const [h, w] = rle.size;
  const bits = new Uint8Array(w * h);
  let i = 0, value = 0;
  for (const run of rle.counts) {
    if (value) {
      for (let k = i; k < i + run; k++) bits[(k % h) * w + Math.floor(k / h)] = 1;
    }
    i += run;
    value = 1 - value;
  }
  return bits;
}

export function maskBounds(bits, w, h) {
  let x0 = w, y0 = h, x1 = -1, y1 = -1;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      if (bits[y * w + x]) {
        if (x < x0) x0 = x;
        if (x > x1) x1 = x;
        if (y < y0) y0 = y;
        if (y > y1) y1 = y;
      }
    }
  }
  return x1 < 0 ? null : { x0, y0, x1: x1 + 1, y1: y1 + 1 };
}

// Paint (or erase) a disc of `radius` at (cx, cy); returns the touched rectangle.
export function paintDisc(bits, w, h, cx, cy, radius, value) {
  const x0 = Math.max(0, Math.floor(cx - radius)), x1 = Math.min(w - 1, Math.ceil(cx + radius));
  const y0 = Math.max(0, Math.floor(cy - radius)), y1 = Math.min(h - 1, Math.ceil(cy + radius));
  const r2 = radius * radius;
  for (let y = y0; y <= y1; y++) {
    for (let x = x0; x <= x1; x++) {
      const dx = x + 0.5 - cx, dy = y + 0.5 - cy;
      if (dx * dx + dy * dy <= r2) bits[y * w + x] = value;
    }
  }
  return { x0, y0, x1: x1 + 1, y1: y1 + 1 };
}
