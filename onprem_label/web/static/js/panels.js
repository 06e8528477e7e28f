// The workspace's palette and side panel: tools, classes, presets, questions, the shape list, comments.

import { $, el, key } from "./dom.js";
import { TOOLS } from "./editor.js";
import { renderHelp, shortcuts } from "./keys.js";
import { PRESETS } from "./viewer.js";

let ws = null; // {editor, viewer, state, mode, changed, showErrors}: set once by the workspace

export function initPanels(context) {
  ws = context;
}

export function buildPalette() {
  $("tools").replaceChildren(...TOOLS.map((tool) => el("button", {
    type: "button", class: "tool", "data-tool": tool.id, "aria-pressed": "false", title: tool.help,
    onclick: () => setTool(tool.id),
  }, tool.label, key(tool.key.toUpperCase()))));
  $("classes").replaceChildren(...ws.state.schema.classes.map((cls) => el("button", {
    type: "button", class: "cls", "data-class": cls.name, "aria-pressed": "false",
    title: `tools: ${cls.tools.join(", ")}`, onclick: () => pickClass(cls.name),
  }, el("span", { class: "swatch", "data-color": cls.color }), cls.name, cls.hotkey ? key(cls.hotkey.toUpperCase()) : null)));
  for (const swatch of document.querySelectorAll(".swatch")) swatch.style.background = swatch.dataset.color;
  $("preset-buttons").replaceChildren(...PRESETS.map((p) => el("button", {
    type: "button", class: "tool", "data-preset": p.name, onclick: () => ws.viewer.setWindow({ preset: p.name }),
  }, p.label, key(`⇧${p.key}`))), el("button", {
    type: "button", class: "tool", onclick: () => ws.viewer.setWindow(null),
  }, "File's window", key("⇧0")));
  buildQuestions();
  renderHelp($("help-rows"), shortcuts(ws.mode, ws.state.schema.classes));
  if (ws.editor.cls) pickClass(ws.editor.cls);
}

function buildQuestions() {
  const questions = ws.state.schema.questions || [];
  $("questions-section").hidden = !questions.length;
  $("questions").replaceChildren(...questions.map((q, qi) => {
    const options = q.options.map((option, oi) => {
      const id = `q${qi}-o${oi}`;
      return el("label", { class: "inline", for: id },
        el("input", { id, type: q.type === "single" ? "radio" : "checkbox", name: q.name, value: option,
                      onchange: ws.changed }), ` ${option}`);
    });
    return el("fieldset", {}, el("legend", { class: q.required ? "required" : "" }, q.name), ...options);
  }));
}

export function readAnswers() {
  const out = {};
  for (const q of ws.state.schema.questions || []) {
    const picked = [...document.querySelectorAll(`#questions input[name="${CSS.escape(q.name)}"]:checked`)].map((i) => i.value);
    if (q.type === "single") {
      if (picked.length) out[q.name] = picked[0];
    } else if (picked.length) {
      out[q.name] = picked;
    }
  }
  return out;
}

export function setAnswers(answers = {}) {
  for (const input of document.querySelectorAll("#questions input")) {
    const value = answers[input.name];
    input.checked = Array.isArray(value) ? value.includes(input.value) : value === input.value;
  }
}

export function setTool(tool) {
  if (tool !== "select" && !ws.editor.allowed(tool)) {
    const cls = ws.editor.classOf(ws.editor.cls);
    const fallback = ws.state.schema.classes.find((c) => c.tools.includes(tool === "eraser" ? "mask" : tool));
    if (!fallback) return ws.showErrors(new Error(`No class of this project allows the ${tool} tool.`));
    if (cls) pickClass(fallback.name, false);
  }
  ws.editor.tool = tool;
  ws.editor.drawing = null;
  for (const b of document.querySelectorAll("#tools button")) b.setAttribute("aria-pressed", String(b.dataset.tool === tool));
  $("brush").hidden = !(tool === "mask" || tool === "eraser");
  ws.editor.redraw();
}

export function pickClass(name, relabel = true) {
  if (relabel && ws.editor.selectedId && ws.editor.relabelSelected(name)) return;
  ws.editor.cls = name;
  for (const b of document.querySelectorAll("#classes button")) b.setAttribute("aria-pressed", String(b.dataset.class === name));
  for (const b of document.querySelectorAll("#tools button")) b.disabled = !ws.editor.allowed(b.dataset.tool, name);
  if (ws.editor.tool !== "select" && !ws.editor.allowed(ws.editor.tool, name)) {
    const first = ws.editor.classOf(name).tools[0];
    setTool(first);
  }
}

// --- the side panel: shapes, comments --------------------------------------------------------------------

export function showShapes() {
  const list = $("shape-list");
  list.replaceChildren(...ws.editor.shapes.map((s, i) => {
    const cls = ws.editor.classOf(s.label) || { color: "#888" };
    const pin = ws.editor.pins.find((p) => p.shapeId === s.id);
    const swatch = el("span", { class: "swatch", "data-color": cls.color });
    swatch.style.background = cls.color;
    return el("li", { "aria-selected": String(s.id === ws.editor.selectedId), "data-shape-id": s.id },
      swatch,
      el("button", { type: "button", class: "label-text", onclick: () => ws.editor.select(s.id) },
        `${i + 1}. ${s.label} ${s.type}${ws.viewer.frames > 1 ? ` · frame ${s.frame + 1}` : ""}${pin ? ` · comment ${pin.number}` : ""}`),
      el("button", { type: "button", class: "secondary", "aria-label": `Delete shape ${i + 1}`, disabled: ws.editor.readOnly,
                     onclick: () => { ws.editor.select(s.id); ws.editor.deleteSelected(); } }, "✕"));
  }));
}

export function showComments(reviews) {
  const rejections = reviews.filter((r) => r.decision === "reject" && r.comment);
  ws.editor.pins = [];
  let number = 0;
  const items = rejections.slice().reverse().map((r) => {
    let pinText = null;
    if (r.shape_id) {
      number += 1;
      ws.editor.pins.push({ shapeId: r.shape_id, number });
      pinText = el("span", { class: "pin" }, `[${number}] `);
    }
    const who = r.reviewer_name || "reviewer";
    const li = el("li", {}, el("div", { class: "task-facts" }, `Round ${r.round + 1} · ${who}`),
      el("blockquote", { class: "comment" }, pinText, r.comment));
    if (r.shape_id) {
      li.querySelector("blockquote").addEventListener("click", () => ws.editor.select(r.shape_id));
    }
    return li;
  });
  $("comments").replaceChildren(...items);
  $("comments-section").hidden = !items.length;
}
