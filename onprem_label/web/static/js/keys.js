// Every keyboard shortcut of the workspaces, in one table: the `?` overlay is drawn from it.

import { TOOLS } from "./editor.js";
import { PRESETS } from "./viewer.js";

export function shortcuts(mode, classes) {
  const rows = [["?", "show or hide this list"]];
  for (const tool of TOOLS) rows.push([tool.key.toUpperCase(), `${tool.label} tool: ${tool.help}`]);
  for (const cls of classes) {
    if (cls.hotkey) rows.push([cls.hotkey.toUpperCase(), `class ${cls.name} (relabels the selected shape)`]);
  }
  rows.push(
    ["[ ]", "smaller / larger brush"],
    ["Enter", "finish the polygon or polyline being drawn"],
    ["Esc", "cancel drawing; else clear the selection"],
    ["Delete, Backspace", "delete the selected shape (while drawing: the last point)"],
    ["Z, Ctrl+Z", "undo"],
    ["Y, Ctrl+Y, Ctrl+Shift+Z", "redo"],
    ["N, →, ↓, Ctrl+wheel", "next frame"],
    ["P, ←, ↑, Ctrl+wheel", "previous frame"],
    ["wheel, + -", "zoom in / out (at the cursor for the wheel)"],
    ["F", "fit the image to the window"],
    ["Shift+F", "1:1 (one image pixel per screen pixel)"],
    ["Space+drag, middle drag", "pan"],
    ["right drag, W+drag", "window/level: left-right width, up-down level"],
  );
  for (const p of PRESETS) rows.push([`Shift+${p.key}`, `window preset ${p.label} (${p.width}/${p.center})`]);
  rows.push(["Shift+0", "the file's own window"], ["H", "hide or show shapes"]);
  if (mode === "label") {
    rows.push(["S, Ctrl+S", "save a draft now (drafts also save by themselves every few seconds)"],
      ["Ctrl+Enter", "submit for review and go to the next task"]);
  } else {
    rows.push(["A", "accept"], ["R", "reject with a comment (pinned to the selected shape)"],
      ["C", "correct and accept (your edits become a new revision)"]);
  }
  return rows;
}

export function renderHelp(tbody, rows) {
  tbody.replaceChildren(...rows.map(([keys, what]) => {
    const tr = document.createElement("tr");
    const k = document.createElement("td");
    const d = document.createElement("td");
    k.textContent = keys;
    d.textContent = what;
    tr.append(k, d);
    return tr;
  }));
}
