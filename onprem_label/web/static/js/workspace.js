// The labeling and review workspaces: lease a task, show its image and shapes, save, submit, review.
// Nothing is lost silently: every save is a new revision on the server, a stale save is shown as a
// conflict with the choice to load the saved version or keep one's own, and a lost lease is said so.

import { api, ApiError } from "./api.js";
import { Editor, TOOLS } from "./editor.js";
import { renderHelp, shortcuts } from "./keys.js";
import { PRESETS, Viewer } from "./viewer.js";

const AUTOSAVE_MS = 4000;
const HEARTBEAT_MS = 60000;

const $ = (id) => document.getElementById(id);
const root = $("workspace");
const mode = root.dataset.mode; // "label" | "review"
const projectId = Number(root.dataset.projectId);
const canvas = $("canvas");

const state = {
  schema: { classes: [], questions: [] },
  task: null, item: null, kind: null, version: null, reviews: [],
  dirty: false, changes: 0, saving: null, blocked: false, invalid: false,
};

const viewer = new Viewer(canvas, { onView: showView, onPaint: painted });
const editor = new Editor(viewer, { onChange: changed, onSelect: showShapes });
viewer.setOverlay((ctx, v) => editor.drawOverlay(ctx, v));

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== false && v !== null && v !== undefined) node.setAttribute(k, v === true ? "" : v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function key(text) {
  return el("span", { class: "key" }, text);
}

// --- status lines ------------------------------------------------------------------------------------

// kind: "saved" | "unsaved" | "saving" | "error"; tests and people read it from data-save-state.
function setSaveState(text, kind = "saved") {
  const s = $("save-state");
  s.textContent = text;
  s.className = `save-state ${kind}`;
  root.dataset.saveState = kind;
}

function banner(text, actions = [], kind = "") {
  const b = $("banner");
  if (!text) {
    b.hidden = true;
    return;
  }
  $("banner-text").textContent = `${text} `;
  $("banner-actions").replaceChildren(...actions.map(([label, fn]) => el("button", { type: "button", onclick: fn }, label)));
  b.className = `banner ${kind}`;
  b.hidden = false;
}

function showErrors(err) {
  const list = (err && err.body && err.body.errors) || [];
  const lines = list.length ? list.map((e) => `${e.field || "annotation"}: ${e.message}`) : [err ? err.message : ""];
  $("errors").replaceChildren(...lines.filter(Boolean).map((t) => el("div", {}, t)));
}

function showView() {
  $("wl").value = viewer.windowText();
  $("zoom").value = `${Math.round(viewer.scale * 100)}%`;
  $("frame-out").value = state.item ? `${viewer.frame + 1} / ${viewer.frames}` : "–";
  if (state.item && Number($("frame").value) !== viewer.frame + 1) $("frame").value = String(viewer.frame + 1);
}

function painted({ frame, failed }) {
  if (failed) {
    banner("This frame could not be loaded from the server. Try another frame, or report it to the project manager.", [], "error");
    return;
  }
  canvas.dataset.paintedFrame = String(frame);
  canvas.dispatchEvent(new CustomEvent("framepainted", { detail: { frame, at: performance.now() } }));
  if (state.pendingShown) {
    state.pendingShown = false;
    root.dataset.taskId = String(state.task.id);
    root.dispatchEvent(new CustomEvent("taskshown", { detail: { taskId: state.task.id, at: performance.now() } }));
  }
}

// --- the palette: tools, classes, presets, questions ----------------------------------------------------

function buildPalette() {
  $("tools").replaceChildren(...TOOLS.map((tool) => el("button", {
    type: "button", class: "tool", "data-tool": tool.id, "aria-pressed": "false", title: tool.help,
    onclick: () => setTool(tool.id),
  }, tool.label, key(tool.key.toUpperCase()))));
  $("classes").replaceChildren(...state.schema.classes.map((cls) => el("button", {
    type: "button", class: "cls", "data-class": cls.name, "aria-pressed": "false",
    title: `tools: ${cls.tools.join(", ")}`, onclick: () => pickClass(cls.name),
  }, el("span", { class: "swatch", "data-color": cls.color }), cls.name, cls.hotkey ? key(cls.hotkey.toUpperCase()) : null)));
  for (const swatch of document.querySelectorAll(".swatch")) swatch.style.background = swatch.dataset.color;
  $("preset-buttons").replaceChildren(...PRESETS.map((p) => el("button", {
    type: "button", class: "tool", "data-preset": p.name, onclick: () => viewer.setWindow({ preset: p.name }),
  }, p.label, key(`⇧${p.key}`))), el("button", {
    type: "button", class: "tool", onclick: () => viewer.setWindow(null),
  }, "File's window", key("⇧0")));
  buildQuestions();
  renderHelp($("help-rows"), shortcuts(mode, state.schema.classes));
  if (editor.cls) pickClass(editor.cls);
}

function buildQuestions() {
  const questions = state.schema.questions || [];
  $("questions-section").hidden = !questions.length;
  $("questions").replaceChildren(...questions.map((q, qi) => {
    const options = q.options.map((option, oi) => {
      const id = `q${qi}-o${oi}`;
      return el("label", { class: "inline", for: id },
        el("input", { id, type: q.type === "single" ? "radio" : "checkbox", name: q.name, value: option,
                      onchange: changed }), ` ${option}`);
    });
    return el("fieldset", {}, el("legend", { class: q.required ? "required" : "" }, q.name), ...options);
  }));
}

function readAnswers() {
  const out = {};
  for (const q of state.schema.questions || []) {
    const picked = [...document.querySelectorAll(`#questions input[name="${CSS.escape(q.name)}"]:checked`)].map((i) => i.value);
    if (q.type === "single") {
      if (picked.length) out[q.name] = picked[0];
    } else if (picked.length) {
      out[q.name] = picked;
    }
  }
  return out;
}

function setAnswers(answers = {}) {
  for (const input of document.querySelectorAll("#questions input")) {
    const value = answers[input.name];
    input.checked = Array.isArray(value) ? value.includes(input.value) : value === input.value;
  }
}

function setTool(tool) {
  if (tool !== "select" && !editor.allowed(tool)) {
    const cls = editor.classOf(editor.cls);
    const fallback = state.schema.classes.find((c) => c.tools.includes(tool === "eraser" ? "mask" : tool));
    if (!fallback) return showErrors(new Error(`No class of this project allows the ${tool} tool.`));
    if (cls) pickClass(fallback.name, false);
  }
  editor.tool = tool;
  editor.drawing = null;
  for (const b of document.querySelectorAll("#tools button")) b.setAttribute("aria-pressed", String(b.dataset.tool === tool));
  $("brush").hidden = !(tool === "mask" || tool === "eraser");
  editor.redraw();
}

function pickClass(name, relabel = true) {
  if (relabel && editor.selectedId && editor.relabelSelected(name)) return;
  editor.cls = name;
  for (const b of document.querySelectorAll("#classes button")) b.setAttribute("aria-pressed", String(b.dataset.class === name));
  for (const b of document.querySelectorAll("#tools button")) b.disabled = !editor.allowed(b.dataset.tool, name);
  if (editor.tool !== "select" && !editor.allowed(editor.tool, name)) {
    const first = editor.classOf(name).tools[0];
    setTool(first);
  }
}

// --- the side panel: shapes, comments --------------------------------------------------------------------

function showShapes() {
  const list = $("shape-list");
  list.replaceChildren(...editor.shapes.map((s, i) => {
    const cls = editor.classOf(s.label) || { color: "#888" };
    const pin = editor.pins.find((p) => p.shapeId === s.id);
    const swatch = el("span", { class: "swatch", "data-color": cls.color });
    swatch.style.background = cls.color;
    return el("li", { "aria-selected": String(s.id === editor.selectedId), "data-shape-id": s.id },
      swatch,
      el("button", { type: "button", class: "label-text", onclick: () => editor.select(s.id) },
        `${i + 1}. ${s.label} ${s.type}${viewer.frames > 1 ? ` · frame ${s.frame + 1}` : ""}${pin ? ` · comment ${pin.number}` : ""}`),
      el("button", { type: "button", class: "secondary", "aria-label": `Delete shape ${i + 1}`, disabled: editor.readOnly,
                     onclick: () => { editor.select(s.id); editor.deleteSelected(); } }, "✕"));
  }));
}

function showComments(reviews) {
  const rejections = reviews.filter((r) => r.decision === "reject" && r.comment);
  editor.pins = [];
  let number = 0;
  const items = rejections.slice().reverse().map((r) => {
    let pinText = null;
    if (r.shape_id) {
      number += 1;
      editor.pins.push({ shapeId: r.shape_id, number });
      pinText = el("span", { class: "pin" }, `[${number}] `);
    }
    const who = r.reviewer_name || "reviewer";
    const li = el("li", {}, el("div", { class: "task-facts" }, `Round ${r.round + 1} · ${who}`),
      el("blockquote", { class: "comment" }, pinText, r.comment));
    if (r.shape_id) {
      li.querySelector("blockquote").addEventListener("click", () => editor.select(r.shape_id));
    }
    return li;
  });
  $("comments").replaceChildren(...items);
  $("comments-section").hidden = !items.length;
}

// --- tasks -------------------------------------------------------------------------------------------

async function nextTask() {
  stopTimers();
  banner(null);
  $("errors").replaceChildren();
  $("task-facts").textContent = "Looking for the next task…";
  let lease;
  try {
    lease = await api("POST", `/projects/${projectId}/tasks/next`, mode === "review" ? { kind: "review" } : {});
  } catch (err) {
    return failed(err, "Could not get the next task");
  }
  if (!lease) return showEmpty();
  await showTask(lease.task, lease.item, lease.kind, lease.annotation, lease.reviews);
}

function showEmpty() {
  state.task = null;
  state.item = null;
  root.dataset.taskId = "";
  viewer.item = null;
  viewer.draw();
  editor.load([]);
  showShapes();
  $("empty").hidden = false;
  $("empty-text").textContent = mode === "review" ? "Nothing is waiting for your review in this project."
    : "No task is waiting for you in this project.";
  $("task-facts").textContent = "No task.";
  $("frames").hidden = true;
  for (const b of document.querySelectorAll("#actions button")) b.disabled = true;
}

async function showTask(task, item, kind, annotation, reviews) {
  $("empty").hidden = true;
  state.task = task;
  state.item = item;
  state.kind = kind;
  state.version = task.version;
  state.reviews = reviews || [];
  state.dirty = false;
  state.blocked = false;
  state.invalid = false;
  editor.readOnly = false;
  for (const b of document.querySelectorAll("#actions button")) b.disabled = false;
  editor.previous = null;
  editor.load(annotation ? annotation.shapes : []);
  setAnswers(annotation ? annotation.classifications : {});
  showComments(state.reviews);
  root.dataset.version = String(task.version);
  const kindText = { label: "New task", rework: `Rework (round ${task.round + 1})`, review: "Review" }[kind] || kind;
  $("task-kind").textContent = kindText;
  $("task-facts").textContent = `Task ${task.id} · item ${item.id} · ${item.kind}${item.modality ? ` ${item.modality}` : ""} · ` +
    `${item.width} × ${item.height}${item.frames > 1 ? ` · ${item.frames} frames` : ""} · round ${task.round + 1}`;
  $("frames").hidden = item.frames <= 1;
  $("frame").max = String(item.frames);
  $("frame").value = "1";
  state.pendingShown = true;
  viewer.setItem(item);
  $("presets").hidden = !viewer.grey;
  showShapes();
  setSaveState(mode === "label" ? `Saved (version ${task.version})` : "");
  if (mode === "review") await showComparison(task, reviews);
  startTimers();
  canvas.focus();
}

async function showComparison(task, reviews) {
  // The labeler's revision the last rejection was about, dashed, beside the one now handed in.
  const last = reviews.filter((r) => r.decision === "reject").pop();
  $("compare-section").hidden = true;
  if (!last || last.annotation_revision == null) return;
  try {
    const data = await api("GET", `/tasks/${task.id}/revisions?revision=${last.annotation_revision}`);
    const earlier = data.revisions[0];
    if (earlier) {
      editor.previous = earlier.shapes;
      $("compare-section").hidden = false;
      $("legend-current").style.borderColor = "#e6194b";
      $("legend-previous").style.borderColor = "#ffd400";
      editor.redraw();
    }
  } catch (err) {
    editor.previous = null;
  }
}

function changed() {
  state.changes += 1;
  state.invalid = false;
  showShapes();
  if (!state.task) return;
  state.dirty = true;
  setSaveState(mode === "label" ? "Unsaved changes" : "Edited: use Correct and accept to keep your changes", "unsaved");
}

function annotationBody() {
  return { shapes: editor.shapes, classifications: readAnswers() };
}

async function save() {
  if (mode !== "label" || !state.task || state.blocked) return false;
  if (state.saving) return state.saving;
  const changesAtStart = state.changes;
  const body = { ...annotationBody(), version: state.version };
  setSaveState("Saving…", "saving");
  state.saving = (async () => {
    try {
      const res = await api("PUT", `/tasks/${state.task.id}/annotation`, body);
      state.version = res.task.version;
      root.dataset.version = String(state.version);
      state.dirty = state.changes !== changesAtStart;
      $("errors").replaceChildren();
      setSaveState(state.dirty ? "Unsaved changes" : `Saved (version ${state.version})`, state.dirty ? "unsaved" : "saved");
      return true;
    } catch (err) {
      handleSaveError(err);
      return false;
    } finally {
      state.saving = null;
    }
  })();
  return state.saving;
}

function handleSaveError(err) {
  if (!(err instanceof ApiError)) throw err;
  if (err.status === 409 && err.code === "stale_version") return conflict(err);
  if (err.status === 409) return leaseLost(err);
  if (err.status === 422) {
    state.invalid = true; // wait for the next edit before trying again
    showErrors(err);
    return setSaveState("Not saved: see the problems listed", "error");
  }
  if (err.status === 401) {
    banner("Your session has ended. Log in again in another tab, then press Save: your edits are still here.", [
      ["Save now", () => save()]], "error");
    return setSaveState("Not saved (logged out)", "error");
  }
  setSaveState(`Not saved: ${err.message} Retrying.`, "error");
}

function conflict(err) {
  state.blocked = true;
  const theirs = err.body.version;
  setSaveState("Conflict: not saved", "error");
  banner(`This task was saved elsewhere (another tab or window) since you opened it: the server has version ${theirs}, ` +
         `you were editing version ${state.version}. Every save is kept as a revision, so nothing is lost either way.`, [
    ["Load the saved version", () => reloadSaved()],
    ["Keep editing mine (saves over it)", () => keepMine(theirs)],
  ]);
}

async function reloadSaved() {
  try {
    const data = await api("GET", `/tasks/${state.task.id}`);
    const mine = editor.snapshot();
    editor.load(data.annotation ? data.annotation.shapes : []);
    editor.undoStack.push(mine); // Undo brings my version back
    setAnswers(data.annotation ? data.annotation.classifications : {});
    state.version = data.task.version;
    root.dataset.version = String(state.version);
    state.blocked = false;
    state.dirty = false;
    banner(null);
    showShapes();
    setSaveState(`Loaded the saved version ${state.version} (Undo brings yours back)`);
  } catch (err) {
    failed(err, "Could not load the saved version");
  }
}

function keepMine(theirs) {
  state.version = theirs;
  state.blocked = false;
  state.dirty = true;
  banner(null);
  save();
}

function leaseLost(err) {
  state.blocked = true;
  editor.readOnly = true;
  stopTimers();
  for (const b of document.querySelectorAll("#actions button")) b.disabled = true;
  setSaveState("Not saved", "error");
  banner(`${err.message} Your latest changes could not be saved.`, [["Get my next task", () => nextTask()]], "error");
}

function failed(err, what) {
  if (err instanceof ApiError && err.status === 409) return leaseLost(err);
  banner(`${what}: ${err.message}`, [["Try again", () => nextTask()]], "error");
}

async function submit() {
  if (!state.task || state.blocked) return;
  if (state.dirty && !(await save())) return;
  const started = performance.now();
  try {
    await api("POST", `/tasks/${state.task.id}/submit`, { version: state.version });
  } catch (err) {
    if (err instanceof ApiError && err.status === 422) return showErrors(err);
    if (err instanceof ApiError && err.status === 409) return handleSaveError(err);
    return failed(err, "Could not submit");
  }
  root.dataset.submittedAt = String(started);
  await nextTask();
}

async function decide(decision, extra = {}) {
  if (!state.task || state.blocked) return;
  const body = { decision, version: state.version, ...extra };
  if (decision === "correct") Object.assign(body, annotationBody());
  try {
    await api("POST", `/tasks/${state.task.id}/review`, body);
  } catch (err) {
    if (err instanceof ApiError && err.status === 422) return showErrors(err);
    if (err instanceof ApiError && err.status === 409) return leaseLost(err);
    return failed(err, "Could not record the review");
  }
  state.dirty = false;
  await nextTask();
}

function openReject() {
  if (!state.task) return;
  const dialog = $("reject-dialog");
  $("reject-comment").value = "";
  $("reject-error").textContent = "";
  $("pin-label").hidden = !editor.selectedId;
  dialog.showModal();
  $("reject-comment").focus();
}

async function release() {
  if (!state.task) return;
  if (mode === "label" && state.dirty) await save();
  try {
    await api("POST", `/tasks/${state.task.id}/release`, {});
  } catch (err) {
    /* the lease may be gone already: leaving is what was asked */
  }
  state.dirty = false;
  window.location.assign(root.dataset.myWork);
}

// --- timers ----------------------------------------------------------------------------------------------

function startTimers() {
  stopTimers();
  if (mode === "label") {
    state.autosave = setInterval(() => {
      if (state.dirty && !state.saving && !state.blocked && !state.invalid && !editor.drag && !editor.drawing) save();
    }, AUTOSAVE_MS);
  }
  state.heartbeat = setInterval(async () => {
    if (!state.task || state.blocked) return;
    try {
      await api("POST", `/tasks/${state.task.id}/heartbeat`, {});
    } catch (err) {
      if (err instanceof ApiError && err.status === 409) leaseLost(err);
    }
  }, HEARTBEAT_MS);
}

function stopTimers() {
  clearInterval(state.autosave);
  clearInterval(state.heartbeat);
}

// --- pointer and keyboard ------------------------------------------------------------------------------

const input = { space: false, wKey: false, gesture: null };

function screenPoint(e) {
  const rect = canvas.getBoundingClientRect();
  return [e.clientX - rect.left, e.clientY - rect.top];
}

canvas.addEventListener("contextmenu", (e) => e.preventDefault());
canvas.addEventListener("pointerdown", (e) => {
  if (!state.item) return;
  canvas.focus();
  canvas.setPointerCapture(e.pointerId);
  const [sx, sy] = screenPoint(e);
  if (e.button === 1 || (e.button === 0 && input.space)) {
    input.gesture = { kind: "pan", sx, sy };
  } else if (e.button === 2 || (e.button === 0 && input.wKey)) {
    if (viewer.grey) input.gesture = { kind: "wl", sx, sy, start: viewer.windowNumbers() };
  } else if (e.button === 0) {
    input.gesture = { kind: "edit" };
    editor.pointerDown(...viewer.toImage(sx, sy));
  }
  e.preventDefault();
});
canvas.addEventListener("pointermove", (e) => {
  if (!state.item) return;
  const [sx, sy] = screenPoint(e);
  const [ix, iy] = viewer.toImage(sx, sy);
  $("cursor").value = ix >= 0 && iy >= 0 && ix <= viewer.width && iy <= viewer.height ? `${Math.floor(ix)}, ${Math.floor(iy)}` : "–";
  const g = input.gesture;
  if (g && g.kind === "pan") {
    viewer.panBy(sx - g.sx, sy - g.sy);
    g.sx = sx;
    g.sy = sy;
  } else if (g && g.kind === "wl") {
    const width = Math.max(1, g.start.width * Math.exp((sx - g.sx) / 200));
    const center = g.start.center - ((sy - g.sy) * g.start.width) / 400;
    viewer.setWindow({ center, width }, { immediate: false });
  } else {
    editor.pointerMove(ix, iy);
  }
});
canvas.addEventListener("pointerup", (e) => {
  const g = input.gesture;
  input.gesture = null;
  if (!state.item) return;
  if (g && g.kind === "wl") viewer.setWindow(viewer.window);
  else if (g && g.kind === "edit") editor.pointerUp(...viewer.toImage(...screenPoint(e)));
});
canvas.addEventListener("dblclick", () => editor.doubleClick());
canvas.addEventListener("wheel", (e) => {
  if (!state.item) return;
  e.preventDefault();
  if (e.ctrlKey || e.shiftKey || e.altKey || e.metaKey) {
    viewer.setFrame(viewer.frame + (e.deltaY > 0 ? 1 : -1));
  } else {
    viewer.zoomBy(e.deltaY < 0 ? 1 : -1, ...screenPoint(e));
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
  const digit = /^Digit(\d)$/.exec(e.code);
  let handled = true;
  if (k === "?") {
    $("help").showModal();
  } else if (e.code === "Space") {
    input.space = true;
  } else if (e.shiftKey && !ctrl && digit) {
    const preset = PRESETS.find((p) => p.key === digit[1]);
    if (digit[1] === "0") viewer.setWindow(null);
    else if (preset && viewer.grey) viewer.setWindow({ preset: preset.name });
  } else if (ctrl && k === "Enter" && mode === "label") {
    submit();
  } else if (ctrl && (k === "z" || k === "Z")) {
    if (e.shiftKey) editor.redo(); else editor.undo();
  } else if (ctrl && (k === "y" || k === "Y")) {
    editor.redo();
  } else if (ctrl && (k === "s" || k === "S")) {
    save();
  } else if (ctrl || e.altKey) {
    handled = false;
  } else if (k === "Enter") {
    editor.finishDrawing();
  } else if (k === "Escape") {
    editor.cancelDrawing();
  } else if (k === "Delete" || k === "Backspace") {
    if (!editor.removeLastVertex()) editor.deleteSelected();
  } else if (k === "ArrowRight" || k === "ArrowDown" || k === "n") {
    viewer.setFrame(viewer.frame + 1);
  } else if (k === "ArrowLeft" || k === "ArrowUp" || k === "p") {
    viewer.setFrame(viewer.frame - 1);
  } else if (k === "+" || k === "=") {
    viewer.zoomBy(1);
  } else if (k === "-") {
    viewer.zoomBy(-1);
  } else if (k === "F") {
    viewer.oneToOne();
  } else if (k === "f") {
    viewer.fit();
    viewer.draw();
    showView();
  } else if (k === "h") {
    editor.hidden = !editor.hidden;
    $("toggle-shapes").setAttribute("aria-pressed", String(editor.hidden));
    editor.redraw();
  } else if (k === "w") {
    input.wKey = true;
  } else if (k === "[" || k === "]") {
    editor.brush = Math.max(1, Math.min(200, editor.brush + (k === "]" ? 2 : -2)));
    $("brush-size").value = String(editor.brush);
  } else if (k === "z") {
    editor.undo();
  } else if (k === "y") {
    editor.redo();
  } else if (k === "s" && mode === "label") {
    save();
  } else if (mode === "review" && k === "a") {
    decide("accept");
  } else if (mode === "review" && k === "r") {
    openReject();
  } else if (mode === "review" && k === "c") {
    decide("correct");
  } else if (TOOLS.some((t) => t.key === k)) {
    setTool(TOOLS.find((t) => t.key === k).id);
  } else if (state.schema.classes.some((c) => c.hotkey === k.toLowerCase())) {
    pickClass(state.schema.classes.find((c) => c.hotkey === k.toLowerCase()).name);
  } else {
    handled = false;
  }
  if (handled) e.preventDefault();
});

// --- buttons -------------------------------------------------------------------------------------------

function bindButtons() {
  const on = (id, fn) => $(id) && $(id).addEventListener("click", fn);
  on("zoom-in", () => viewer.zoomBy(1));
  on("zoom-out", () => viewer.zoomBy(-1));
  on("fit", () => { viewer.fit(); viewer.draw(); showView(); });
  on("one-to-one", () => viewer.oneToOne());
  on("toggle-shapes", () => {
    editor.hidden = !editor.hidden;
    $("toggle-shapes").setAttribute("aria-pressed", String(editor.hidden));
    editor.redraw();
  });
  on("help-button", () => $("help").showModal());
  on("prev-frame", () => viewer.setFrame(viewer.frame - 1));
  on("next-frame", () => viewer.setFrame(viewer.frame + 1));
  on("retry", () => nextTask());
  on("save", () => save());
  on("submit", () => submit());
  on("release", () => release());
  on("accept", () => decide("accept"));
  on("reject", () => openReject());
  on("correct", () => decide("correct"));
  on("reject-cancel", () => $("reject-dialog").close());
  $("frame").addEventListener("input", () => viewer.setFrame(Number($("frame").value) - 1));
  $("brush-size").addEventListener("input", () => { editor.brush = Number($("brush-size").value); });
  $("reject-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const comment = $("reject-comment").value.trim();
    if (!comment) {
      $("reject-error").textContent = "A rejection needs a comment for the labeler.";
      return;
    }
    const pin = editor.selectedId && $("reject-pin").checked ? { shape_id: editor.selectedId } : {};
    $("reject-dialog").close();
    decide("reject", { comment, ...pin });
  });
  window.addEventListener("beforeunload", (e) => {
    if (state.dirty && state.task && !state.blocked) {
      e.preventDefault();
      e.returnValue = "";
    }
  });
}

async function start() {
  bindButtons();
  try {
    const project = await api("GET", `/projects/${projectId}`);
    state.schema = project.label_schema || { classes: [], questions: [] };
  } catch (err) {
    return banner(`Could not open the project: ${err.message}`, [], "error");
  }
  editor.setClasses(state.schema.classes);
  buildPalette();
  setTool(editor.allowed("bbox") ? "bbox" : "select");
  await nextTask();
}

start();
