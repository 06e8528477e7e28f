// The quality and people page: accuracy beside its target, labelers, reviewers, proposals to confirm,
// recommended people, gold items, pay statements and pre-label imports. Every figure and change goes
// through the JSON API.

import { api } from "./api.js";
import { $, el, setStatus } from "./admin-dom.js";

const root = $("project-quality");
const projectId = Number(root.dataset.projectId);
const base = `/projects/${projectId}`;
const names = {}; // user id -> username, from the figures (proposals name people by id)

function percent(p) {
  return p === null || p === undefined ? "–" : `${(p * 100).toFixed(1)}%`;
}

// A measured share with its count and interval: "97.0% (n = 300, 95% CI 94.4–98.5%)".
function share(m) {
  if (!m || m.value === null || m.value === undefined) return "not measured yet";
  const ci = m.ci95 ? `, 95% CI ${percent(m.ci95[0])}–${percent(m.ci95[1])}` : "";
  return `${percent(m.value)} (n = ${m.count}${ci})`;
}

function seconds(s) {
  if (s === null || s === undefined) return "–";
  return s >= 60 ? `${Math.floor(s / 60)} min ${Math.round(s % 60)} s` : `${Math.round(s)} s`;
}

function fill(id, rows, empty) {
  const table = $(id);
  const columns = table.tHead ? table.tHead.rows[0].cells.length : 2;
  table.tBodies[0].replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: columns, class: "muted" }, empty))]));
}

function line(label, value, attrs = {}) {
  return el("tr", attrs, el("th", { scope: "row" }, label), el("td", {}, value));
}

function renderProject(q) {
  const p = q.project;
  const verdict = p.meets_target === null ? "not measured yet" : p.meets_target ? "met" : "not shown yet";
  fill("q-project", [
    line("Estimated label accuracy", share(p.estimated_label_accuracy), { "data-figure": "estimate" }),
    line("Target", `${percent(p.target)}: ${verdict}`, { "data-figure": "target", "data-meets": String(p.meets_target) }),
    line("Accepted gold checks right", share(p.accepted_gold)),
    line("Spot checks upheld by a second reviewer", share(p.spot_checks)),
    line("First-pass acceptance", share(p.first_pass_acceptance)),
    line("Gold accuracy (first answers)", share(p.gold_accuracy)),
  ], "");
  fill("q-classes", q.classes.map((c) => el("tr", { "data-class": c.label }, el("th", { scope: "row" }, c.label),
    el("td", { class: "num" }, share(c.first_pass)),
    el("td", { class: "num" }, c.rework_rounds_per_task === null ? "–" : c.rework_rounds_per_task.toFixed(2)),
    el("td", { class: "num" }, seconds(c.seconds_per_task)), el("td", { class: "num" }, share(c.gold_shape_recall)),
    el("td", { class: "num" }, String(c.extra_shapes)))), "No reviewed work yet.");
  const c = q.consensus;
  $("q-consensus").hidden = !c;
  if (c) {
    fill("q-consensus", [line("Labelers per item", String(c.k)), line("Items with every copy in", String(c.items_complete)),
      line("Mean agreement", percent(c.mean_agreement)), line("Items under 50% agreement", String(c.low_agreement_items)),
      ...Object.entries(c.fleiss_kappa).map(([name, k]) => line(`Fleiss' kappa: ${name}`, k === null ? "–" : k.toFixed(3)))], "");
  }
  fill("q-labelers", q.labelers.map((l) => el("tr", { "data-user": l.username }, el("th", { scope: "row" }, l.username),
    el("td", { class: "num" }, String(l.accepted)), el("td", { class: "num" }, share(l.first_pass)),
    el("td", { class: "num" }, share(l.gold_accuracy)),
    el("td", { class: "num" }, l.rework_rounds_per_task === null ? "–" : l.rework_rounds_per_task.toFixed(2)),
    el("td", { class: "num" }, seconds(l.seconds_per_task)))), "No labeled work yet.");
  fill("q-reviewers", q.reviewers.map((r) => el("tr", { "data-user": r.username }, el("th", { scope: "row" }, r.username),
    el("td", { class: "num" }, String(r.reviews)), el("td", { class: "num" }, share(r.gold_agreement)),
    el("td", { class: "num" }, share(r.second_review_agreement)), el("td", { class: "num" }, seconds(r.seconds_per_review)))),
  "No reviews yet.");
}

async function decide(proposal, confirm) {
  try {
    await api("POST", `${base}/people/proposals/${proposal.id}`, { confirm });
    setStatus($("proposals-status"), confirm ? "Confirmed: the project role changed." : "Dismissed.", "ok");
  } catch (err) {
    setStatus($("proposals-status"), err.message, "error");
  }
  await loadProposals();
}

async function loadProposals() {
  const { proposals } = await api("GET", `${base}/people/proposals`);
  fill("q-proposals", proposals.map((p) => el("tr", { "data-proposal": String(p.id), "data-status": p.status },
    el("td", {}, names[p.user_id] || `user ${p.user_id}`), el("td", {}, p.kind === "promote" ? "make reviewer" : "take reviewer role away"),
    el("td", {}, p.reason), el("td", {}, p.status),
    el("td", {}, ...(p.status === "open" ? [el("button", { type: "button", onclick: () => decide(p, true) }, "Confirm"), " ",
      el("button", { type: "button", class: "secondary", onclick: () => decide(p, false) }, "Dismiss")] : ["–"])))),
  "No proposals.");
}

async function loadRecommended() {
  const r = await api("GET", `${base}/people/recommended`);
  $("needed-skills").textContent = `Ranked by fit on: ${r.needed.join(", ") || "nothing declared"}.`;
  fill("q-recommended", r.people.map((p) => el("tr", { "data-user": p.username }, el("th", { scope: "row" }, p.username),
    el("td", { class: "num" }, percent(p.fit)), el("td", { class: "num" }, String(p.experience)),
    el("td", {}, p.worked_here ? "yes" : "no"))), "No labelers.");
}

async function loadGold() {
  const { gold } = await api("GET", `${base}/gold`);
  fill("q-gold", gold.map((g) => el("tr", { "data-item": String(g.item_id) }, el("th", { scope: "row" }, String(g.item_id)),
    el("td", {}, g.use), el("td", { class: "num" }, String(g.reference.shapes.length)), el("td", {}, g.active ? "yes" : "no"),
    el("td", {}, g.active ? el("button", { type: "button", class: "secondary", onclick: () => unmark(g.item_id) }, "Stop using") : "–"))),
  "No gold items yet.");
}

async function unmark(itemId) {
  try {
    await api("DELETE", `${base}/gold/${itemId}`);
    setStatus($("gold-status"), `Item ${itemId} is no longer gold.`, "ok");
  } catch (err) {
    setStatus($("gold-status"), err.message, "error");
  }
  await loadGold();
}

$("gold-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const status = $("gold-status");
  try {
    const found = await api("GET", `/tasks/${Number($("gold-task").value)}`);
    if (found.task.state !== "accepted" || !found.annotation) throw new Error("Choose an accepted task: its labels become the reference.");
    const { shapes, classifications } = found.annotation;
    await api("PUT", `${base}/gold/${found.task.item_id}`, { reference: { shapes, classifications }, use: $("gold-use").value });
    setStatus(status, `Item ${found.task.item_id} is gold now.`, "ok");
  } catch (err) {
    setStatus(status, err.message, "error");
  }
  await loadGold();
});

function period() {
  const q = new URLSearchParams();
  if ($("pay-from").value) q.set("from", $("pay-from").value);
  if ($("pay-to").value) q.set("to", $("pay-to").value);
  return q;
}

async function loadPay() {
  const q = period();
  const csv = new URLSearchParams(q);
  csv.set("format", "csv");
  $("pay-csv").href = `/api/v1${base}/pay/statements?${csv}`;
  try {
    const data = await api("GET", `${base}/pay/statements?${q}`);
    const money = (v) => (data.currency ? `${v} ${data.currency}` : "no pay set");
    fill("q-pay", data.statements.map((s) => el("tr", { "data-user": s.username, "data-under": String(s.under_minimum) },
      el("th", { scope: "row" }, s.username), el("td", { class: "num" }, String(s.label_tasks)),
      el("td", { class: "num" }, String(s.reviews)), el("td", { class: "num" }, money(s.total)),
      el("td", { class: "num" }, (s.active_seconds / 3600).toFixed(2)),
      el("td", { class: "num" }, s.effective_hourly ? money(s.effective_hourly) : "–"),
      el("td", {}, s.under_minimum ? `under ${money(s.minimum_hourly)}` : "ok"))), "No pay or work in this period.");
    setStatus($("pay-status"), `${data.from.slice(0, 10)} to ${data.to.slice(0, 10)} (exclusive).`, "");
  } catch (err) {
    setStatus($("pay-status"), err.message, "error");
  }
}

// What labelers did with a model's drafts (docs/prelabels.md): the share of its shapes kept as they were.
async function loadImports() {
  const data = await api("GET", `${base}/imports`);
  fill("q-imports", Object.entries(data.by_source).map(([source, r]) => el("tr", { "data-source": source },
    el("th", { scope: "row" }, source), el("td", { class: "num" }, String(r.tasks)),
    el("td", { class: "num" }, share(r.kept_unchanged)))), "No imported drafts handed in yet.");
}

$("pay-form").addEventListener("submit", (event) => {
  event.preventDefault();
  loadPay();
});

$("evaluate").addEventListener("click", async () => {
  try {
    const { proposals } = await api("POST", `${base}/people/evaluate`, {});
    setStatus($("proposals-status"), `${proposals.length} new proposal(s).`, "ok");
  } catch (err) {
    setStatus($("proposals-status"), err.message, "error");
  }
  await start();
});

async function start() {
  try {
    const q = await api("GET", `${base}/quality`);
    renderProject(q);
    for (const p of [...q.labelers, ...q.reviewers]) names[p.user_id] = p.username;
    await Promise.all([loadProposals(), loadRecommended(), loadGold(), loadPay(), loadImports()]);
    root.dataset.loaded = "true";
  } catch (err) {
    $("load-error").hidden = false;
    $("load-error").textContent = `Could not load the figures: ${err.message}`;
  }
}

start();
