// The labeling and review workspaces: lease a task, show its image and shapes, save, submit, review.
// Nothing is lost silently: every save is a new revision on the server, a stale save is shown as a
// conflict with the choice to load the saved version or keep one's own, and a lost lease is said so.

import { api, ApiError } from "./api.js";
import { $, el } from "./dom.js";
import { Editor } from "./editor.js";
import { bindInput } from "./input.js";
import { buildPalette, initPanels, pickClass, readAnswers, setAnswers, setTool, showComments, showShapes } from "./panels.js";
import { Viewer } from "./viewer.js";

const AUTOSAVE_MS = 4000;
const HEARTBEAT_MS = 60000; // at most; a third of the project's lease when that is shorter

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
    state.pendingShown = false; // shown as a failure: rejecting or giving the task back stays possible
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
    if (err instanceof ApiError && err.code === "qualification_required") return showQualification(err);
    return failed(err, "Could not get the next task");
  }
  if (!lease) return showEmpty();
  await showTask(lease.task, lease.item, lease.kind, lease.annotation, lease.reviews);
}

// --- the qualification test ---------------------------------------------------------------------------

// The project asks for a passed test before live work: say where the person stands, offer the test.
function showQualification(err) {
  showEmpty();
  const standing = err.body.qualification || {};
  const canStart = !standing.under_way && !standing.passed && standing.attempts_left > 0 && !standing.next_attempt_at;
  $("empty-text").textContent = err.message;
  root.dataset.qualification = canStart ? "can-start" : "blocked";
  banner(`Qualification: ${standing.items} questions, pass mark ${Math.round((standing.pass_mark || 0) * 100)}%. ` +
    `Attempts left: ${standing.attempts_left}.`, canStart ? [["Start the test", startTest]] : [], "");
}

async function startTest() {
  try {
    await api("POST", `/projects/${projectId}/qualification`, {});
  } catch (err) {
    return banner(`Could not start the test: ${err.message}`, [], "error");
  }
  await nextTask();
}

// After a test question: the person's shapes (solid) against the reference (dashed), with the score.
function showFeedback(feedback) {
  stopTimers();
  editor.readOnly = true;
  editor.previous = feedback.reference.shapes;
  $("legend-current-text").textContent = "your answer";
  $("legend-previous-text").textContent = "the reference answer";
  $("compare-section").hidden = false;
  editor.redraw();
  for (const b of document.querySelectorAll("#actions button")) b.disabled = true;
  const d = feedback.detail || {};
  const attempt = feedback.attempt || {};
  const done = attempt.passed === true || attempt.passed === false;
  const verdict = feedback.correct ? "Right" : "Not right";
  const facts = `${verdict}: score ${Math.round(feedback.score * 100)}% (${d.matched} of your shapes matched, ` +
    `${d.missed} missed, ${d.extra} extra; ${d.questions_right} of ${d.questions} questions right).`;
  const end = done ? ` Test ${attempt.passed ? "passed" : "not passed"}: ${attempt.correct} of ${attempt.questions} right.` : "";
  root.dataset.feedback = feedback.correct ? "right" : "wrong";
  banner(facts + end, [[done ? "Continue" : "Next question", () => nextTask()]], feedback.correct ? "" : "error");
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
  root.dataset.feedback = "";
  $("legend-current-text").textContent = "current revision";
  $("legend-previous-text").textContent = "revision reviewed last round";
  const kindText = { label: "New task", rework: `Rework (round ${task.round + 1})`, review: "Review",
    qualification: "Qualification test question" }[kind] || kind;
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
  // A model's predictions (a pre-label import) open as drafts: say whose they are until the first save.
  const drafts = mode === "label" && annotation && annotation.kind === "import";
  setSaveState(drafts ? `Drafts from ${annotation.source}: correct them and save`
    : mode === "label" ? `Saved (version ${task.version})` : "");
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

// One hand-in or decision at a time, and only on a task whose image is on screen.
function mayAct() {
  return state.task && !state.blocked && !state.acting && !state.pendingShown;
}

async function submit() {
  if (!mayAct()) return;
  state.acting = true;
  try {
    if (state.dirty && !(await save())) return;
    let answer;
    try {
      answer = await api("POST", `/tasks/${state.task.id}/submit`, { version: state.version });
    } catch (err) {
      if (err instanceof ApiError && err.status === 422) return showErrors(err);
      if (err instanceof ApiError && err.status === 409) return handleSaveError(err);
      return failed(err, "Could not submit");
    }
    if (answer && answer.feedback) return showFeedback(answer.feedback);
    await nextTask();
  } finally {
    state.acting = false;
  }
}

async function decide(decision, extra = {}) {
  if (!mayAct()) return;
  if (decision === "correct" && !state.dirty) {
    // A correction with no change would count against the labeler as a first-pass miss.
    return showErrors(new Error("Nothing was changed: press A to accept as it is, or edit the shapes first."));
  }
  const body = { decision, version: state.version, ...extra };
  if (decision === "correct") Object.assign(body, annotationBody());
  state.acting = true;
  try {
    try {
      await api("POST", `/tasks/${state.task.id}/review`, body);
    } catch (err) {
      if (err instanceof ApiError && err.status === 422) return showErrors(err);
      if (err instanceof ApiError && err.status === 409) return leaseLost(err);
      return failed(err, "Could not record the review");
    }
    state.dirty = false;
    await nextTask();
  } finally {
    state.acting = false;
  }
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
  }, Math.min(HEARTBEAT_MS, (state.leaseMinutes * 60000) / 3));
}

function stopTimers() {
  clearInterval(state.autosave);
  clearInterval(state.heartbeat);
}

// --- pointer and keyboard ------------------------------------------------------------------------------

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
  initPanels({ editor, viewer, state, mode, changed, showErrors });
  bindInput({ canvas, viewer, editor, state, mode, submit, save, decide, openReject, setTool, pickClass, showView });
  bindButtons();
  try {
    const project = await api("GET", `/projects/${projectId}`);
    state.schema = project.label_schema || { classes: [], questions: [] };
    state.leaseMinutes = (project.settings && project.settings.lease_minutes) || 30;
  } catch (err) {
    return banner(`Could not open the project: ${err.message}`, [], "error");
  }
  editor.setClasses(state.schema.classes);
  buildPalette();
  setTool(editor.allowed("bbox") ? "bbox" : "select");
  await nextTask();
}

start();
