// Pointer, wheel and keyboard input of the workspace: pan, window/level drag, drawing, shortcuts.

import { $ } from "./dom.js";
import { TOOLS } from "./editor.js";
import { PRESETS } from "./viewer.js";

// ws: {canvas, viewer, editor, state, mode, submit, save, decide, openReject, setTool, pickClass, showView}
export function bindInput(ws) {
  const input = { space: false, wKey: false, gesture: null };

  function screenPoint(e) {
    const rect = ws.canvas.getBoundingClientRect();
    return [e.clientX - rect.left, e.clientY - rect.top];
  }

  ws.canvas.addEventListener("contextmenu", (e) => e.preventDefault());
  ws.canvas.addEventListener("pointerdown", (e) => {
    if (!ws.state.item) return;
    ws.canvas.focus();
    ws.canvas.setPointerCapture(e.pointerId);
    const [sx, sy] = screenPoint(e);
    if (e.button === 1 || (e.button === 0 && input.space)) {
      input.gesture = { kind: "pan", sx, sy };
    } else if (e.button === 2 || (e.button === 0 && input.wKey)) {
      if (ws.viewer.grey) input.gesture = { kind: "wl", sx, sy, start: ws.viewer.windowNumbers() };
    } else if (e.button === 0) {
      input.gesture = { kind: "edit" };
      ws.editor.pointerDown(...ws.viewer.toImage(sx, sy));
    }
    e.preventDefault();
  });
  ws.canvas.addEventListener("pointermove", (e) => {
    if (!ws.state.item) return;
    const [sx, sy] = screenPoint(e);
    const [ix, iy] = ws.viewer.toImage(sx, sy);
    $("cursor").value = ix >= 0 && iy >= 0 && ix <= ws.viewer.width && iy <= ws.viewer.height ? `${Math.floor(ix)}, ${Math.floor(iy)}` : "–";
    const g = input.gesture;
    if (g && g.kind === "pan") {
      ws.viewer.panBy(sx - g.sx, sy - g.sy);
      g.sx = sx;
      g.sy = sy;
    } else if (g && g.kind === "wl") {
      const width = Math.max(1, g.start.width * Math.exp((sx - g.sx) / 200));
      const center = g.start.center - ((sy - g.sy) * g.start.width) / 400;
      ws.viewer.setWindow({ center, width }, { immediate: false });
    } else {
      ws.editor.pointerMove(ix, iy);
    }
  });
  ws.canvas.addEventListener("pointerup", (e) => {
    const g = input.gesture;
    input.gesture = null;
    if (!ws.state.item) return;
    if (g && g.kind === "wl") ws.viewer.setWindow(ws.viewer.window);
    else if (g && g.kind === "edit") ws.editor.pointerUp(...ws.viewer.toImage(...screenPoint(e)));
  });
  ws.canvas.addEventListener("dblclick", () => ws.editor.doubleClick());
  ws.canvas.addEventListener("wheel", (e) => {
    if (!ws.state.item) return;
    e.preventDefault();
    if (e.ctrlKey || e.shiftKey || e.altKey || e.metaKey) {
      ws.viewer.setFrame(ws.viewer.frame + (e.deltaY > 0 ? 1 : -1));
    } else {
      ws.viewer.zoomBy(e.deltaY < 0 ? 1 : -1, ...screenPoint(e));
    }
  }, { passive: false });

  function typing(e) {
    const t = e.target;
    return t instanceof HTMLElement && (t.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(t.tagName)) &&
      !(t.type === "radio" || t.type === "checkbox" || t.type === "range");
  }

  document.addEventListener("keyup", (e) => {
    if (e.code === "Space") input.space = false;
    if (e.key === "w" || e.key === "W") input.wKey = false;
  });

  document.addEventListener("keydown", (e) => {
    if (document.querySelector("dialog[open]") || typing(e)) return;
    const k = e.key, ctrl = e.ctrlKey || e.metaKey;
    // A held key repeats: never let it hand in, save or decide again (the next task would be
    // decided unseen).
    if (e.repeat && (["a", "r", "c", "s", "S"].includes(k) || k === "Enter")) {
      e.preventDefault();
      return;
    }
    const digit = /^Digit(\d)$/.exec(e.code);
    let handled = true;
    if (k === "?") {
      $("help").showModal();
    } else if (e.code === "Space") {
      input.space = true;
    } else if (e.shiftKey && !ctrl && digit) {
      const preset = PRESETS.find((p) => p.key === digit[1]);
      if (digit[1] === "0") ws.viewer.setWindow(null);
      else if (preset && ws.viewer.grey) ws.viewer.setWindow({ preset: preset.name });
    } else if (ctrl && k === "Enter" && ws.mode === "label") {
      ws.submit();
    } else if (ctrl && (k === "z" || k === "Z")) {
      if (e.shiftKey) ws.editor.redo(); else ws.editor.undo();
    } else if (ctrl && (k === "y" || k === "Y")) {
      ws.editor.redo();
    } else if (ctrl && (k === "s" || k === "S")) {
      ws.save();
    } else if (ctrl || e.altKey) {
      handled = false;
    } else if (k === "Enter") {
      ws.editor.finishDrawing();
    } else if (k === "Escape") {
      ws.editor.cancelDrawing();
    } else if (k === "Delete" || k === "Backspace") {
      if (!ws.editor.removeLastVertex()) ws.editor.deleteSelected();
    } else if (k === "ArrowRight" || k === "ArrowDown" || k === "n") {
      ws.viewer.setFrame(ws.viewer.frame + 1);
    } else if (k === "ArrowLeft" || k === "ArrowUp" || k === "p") {
      ws.viewer.setFrame(ws.viewer.frame - 1);
    } else if (k === "+" || k === "=") {
      ws.viewer.zoomBy(1);
    } else if (k === "-") {
      ws.viewer.zoomBy(-1);
    } else if (k === "F") {
      ws.viewer.oneToOne();
    } else if (k === "f") {
      ws.viewer.fit();
      ws.viewer.draw();
      ws.showView();
    } else if (k === "h") {
      ws.editor.hidden = !ws.editor.hidden;
      $("toggle-shapes").setAttribute("aria-pressed", String(ws.editor.hidden));
      ws.editor.redraw();
    } else if (k === "w") {
      input.wKey = true;
    } else if (k === "[" || k === "]") {
      ws.editor.brush = Math.max(1, Math.min(200, ws.editor.brush + (k === "]" ? 2 : -2)));
      $("brush-size").value = String(ws.editor.brush);
    } else if (k === "z") {
      ws.editor.undo();
    } else if (k === "y") {
      ws.editor.redo();
    } else if (k === "s" && ws.mode === "label") {
      ws.save();
    } else if (ws.state.schema.classes.some((c) => c.hotkey === k.toLowerCase())) {
      // Before the tool keys: a schema made before a key was reserved keeps its class hotkey.
      ws.pickClass(ws.state.schema.classes.find((c) => c.hotkey === k.toLowerCase()).name);
    } else if (ws.mode === "review" && k === "a") {
      ws.decide("accept");
    } else if (ws.mode === "review" && k === "r") {
      ws.openReject();
    } else if (ws.mode === "review" && k === "c") {
      ws.decide("correct");
    } else if (TOOLS.some((t) => t.key === k)) {
      ws.setTool(TOOLS.find((t) => t.key === k).id);
    } else {
      handled = false;
    }
    if (handled) e.preventDefault();
  });
}
