// The project dashboard: tasks per state, labeler quality, reviewer load, throughput and recent rejection
// comments, as tables with bars whose widths are set through the CSSOM (the CSP forbids style attributes).

import { api } from "./api.js";
import { $, el, setStatus } from "./admin-dom.js";

// The workflow's order (the API's JSON object comes with its keys sorted by name).
export const STATES = ["new", "labeling", "submitted", "reviewing", "rework", "escalated", "accepted"];
export const STATE_LABELS = { new: "New", labeling: "Labeling", submitted: "Waiting for review", reviewing: "In review",
                              rework: "Rework", escalated: "Escalated", accepted: "Accepted" };

function bar(fraction, kind = "") {
  const fill = el("span", { class: `bar-fill ${kind}` });
  fill.style.width = `${Math.max(0, Math.min(1, fraction || 0)) * 100}%`;
  return el("span", { class: "bar", "aria-hidden": "true" }, fill);
}

function percent(value) {
  return value === null || value === undefined ? "not reviewed yet" : `${Math.round(value * 100)}%`;
}

function number(value, digits = 2) {
  return value === null || value === undefined ? "–" : String(Math.round(value * 10 ** digits) / 10 ** digits);
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "no accepted task yet";
  const minutes = Math.floor(seconds / 60);
  return minutes ? `${minutes} min ${Math.round(seconds % 60)} s` : `${Math.round(seconds)} s`;
}

function fill(tableId, rows, empty) {
  const body = $(tableId).tBodies[0];
  const columns = $(tableId).tHead ? $(tableId).tHead.rows[0].cells.length : 2;
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: columns, class: "muted" }, empty))]));
}

function renderCounts(counts) {
  const states = [...STATES, ...Object.keys(counts).filter((s) => !STATES.includes(s))];
  const top = Math.max(1, ...states.map((s) => counts[s] || 0));
  fill("dash-counts", states.map((s) => el("tr", { "data-state": s },
    el("th", { scope: "row" }, STATE_LABELS[s] || s), el("td", { class: "num" }, String(counts[s] || 0)),
    el("td", { class: "bar-cell" }, bar((counts[s] || 0) / top, s)))), "");
}

function renderThroughput(numbers, waiting) {
  const t = numbers.throughput || {};
  const lines = [["Accepted in the last hour", t.accepted_last_hour], ["Accepted in the last 24 hours", t.accepted_last_24h],
                 ["Accepted per hour (24-hour average)", number(t.accepted_per_hour_24h)],
                 ["Active time per accepted task", duration(numbers.active_seconds_per_accepted_task)],
                 ["Waiting for review", waiting]];
  fill("dash-throughput", lines.map(([label, value]) => el("tr", {},
    el("th", { scope: "row" }, label), el("td", { class: "num" }, String(value ?? 0)))), "");
}

function renderLabelers(labelers) {
  fill("dash-labelers", labelers.map((l) => el("tr", { "data-user": l.username },
    el("th", { scope: "row" }, l.username), el("td", { class: "num" }, String(l.accepted)),
    el("td", { class: "num" }, String(l.reviewed_first_pass)),
    el("td", { class: "num" }, percent(l.first_pass_acceptance)),
    el("td", { class: "bar-cell" }, bar(l.first_pass_acceptance, "accepted")),
    el("td", { class: "num" }, number(l.rework_rounds_per_reviewed_task)))), "No labeled task reviewed yet.");
}

function renderReviewers(reviewers) {
  const top = Math.max(1, ...reviewers.map((r) => r.reviews));
  fill("dash-reviewers", reviewers.map((r) => el("tr", { "data-user": r.username },
    el("th", { scope: "row" }, r.username), el("td", { class: "num" }, String(r.reviews)),
    el("td", { class: "bar-cell" }, bar(r.reviews / top, "reviewing")),
    el("td", { class: "num" }, String(r.reviewing_now)))), "No reviews yet.");
}

function renderRejections(rejections) {
  $("dash-rejections").replaceChildren(...rejections.map((r) => el("li", { "data-task-id": r.task_id },
    el("span", { class: "muted" },
      `Task ${r.task_id} · round ${r.round + 1} · ${r.reviewer} to ${r.labeler} · ${r.created_at.slice(0, 16).replace("T", " ")} UTC`
      + (r.shape_id ? ` · on shape ${r.shape_id}` : "")),
    el("blockquote", { class: "comment" }, r.comment || "(no comment)"))));
  $("dash-no-rejections").hidden = rejections.length > 0;
}

export function createDashboard({ projectId, root, onNumbers = () => {} }) {
  const status = $("dashboard-status");
  async function refresh() {
    setStatus(status, "Loading…", "busy");
    let numbers;
    try {
      numbers = await api("GET", `/projects/${projectId}/dashboard`);
    } catch (err) {
      setStatus(status, `The numbers could not be loaded: ${err.message}`, "error");
      return;
    }
    const reviewers = (numbers.reviewers || []).filter((r) => "user_id" in r);
    const waiting = (numbers.reviewers || []).find((r) => "waiting_for_review" in r);
    renderCounts(numbers.counts || {});
    renderThroughput(numbers, waiting ? waiting.waiting_for_review : (numbers.counts || {}).submitted);
    renderLabelers(numbers.labelers || []);
    renderReviewers(reviewers);
    renderRejections(numbers.recent_rejections || []);
    const total = Object.values(numbers.counts || {}).reduce((a, b) => a + b, 0);
    setStatus(status, `${total} task${total === 1 ? "" : "s"}; numbers as of ${new Date().toLocaleTimeString()}.`, "ok");
    onNumbers(numbers);
    root.dataset.dashboardLoads = String(Number(root.dataset.dashboardLoads || 0) + 1);
  }
  $("dashboard-refresh").addEventListener("click", refresh);
  return { refresh };
}
