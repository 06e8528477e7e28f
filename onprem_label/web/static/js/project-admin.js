// A project's admin page: label schema editor with live preview, members, upload with progress,
// dashboard and workflow settings. Every change goes through the JSON API, which decides who may do what.

import { api } from "./api.js";
import { $, clearErrors, el, setStatus, showErrors } from "./admin-dom.js";
import { createDashboard } from "./project-dashboard.js";
import { initUpload } from "./project-upload.js";
import { SchemaEditor } from "./schema-editor.js";

const root = $("project-admin");
const projectId = Number(root.dataset.projectId);
const SETTINGS = ["review_rate", "lease_minutes", "max_rounds"];

// Any task past "new" means someone has worked under the current schema: say what a change then means.
const started = (numbers) => Object.entries(numbers.counts || {}).some(([state, n]) => state !== "new" && n > 0);
const dashboard = createDashboard({
  projectId, root, onNumbers: (numbers) => { $("schema-started").hidden = !started(numbers); },
});
const editor = new SchemaEditor({ projectId, tools: root.dataset.tools.split(" "), onSaved: () => dashboard.refresh() });
initUpload({ projectId, root, onDone: () => dashboard.refresh() });

// An answer without a field list still says what went wrong, in the section's general slot.
function fieldErrors(err, fallbackField) {
  return (err.body && err.body.errors && err.body.errors.length) ? err.body.errors
    : [{ field: fallbackField, message: err.message }];
}

// --- members -------------------------------------------------------------------------------------------

async function loadMembers() {
  const { members } = await api("GET", `/projects/${projectId}/members`);
  $("member-rows").replaceChildren(...members.map((m) => el("tr", { "data-username": m.username, "data-role": m.role },
    el("td", {}, m.username), el("td", {}, m.display_name || ""), el("td", {}, m.role))));
  $("no-members").hidden = members.length > 0;
}

$("member-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const status = $("member-status");
  const username = $("member-username").value.trim();
  const role = $("member-role").value;
  clearErrors(form);
  setStatus(status, "Adding…", "busy");
  try {
    await api("POST", `/projects/${projectId}/members`, { username, role });
  } catch (err) {
    const { unplaced, first } = showErrors(form, fieldErrors(err, ""));
    setStatus(status, unplaced.length ? err.message : "Not added: see the marked field.", "error");
    if (first) first.focus();
    return;
  }
  $("member-username").value = "";
  setStatus(status, `${username} is now a ${role} of this project.`, "ok");
  await loadMembers().catch((err) => setStatus(status, err.message, "error"));
});

// --- settings ------------------------------------------------------------------------------------------

function showSettings(settings) {
  for (const name of SETTINGS) {
    if (settings && settings[name] !== undefined) $(`setting-${name}`).value = String(settings[name]);
  }
  rateWarning();
}

function rateWarning() {
  const rate = Number($("setting-review_rate").value);
  $("review-rate-warning").hidden = !(rate > 0 && rate < 1);
}

$("setting-review_rate").addEventListener("input", rateWarning);

$("settings-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const section = $("settings");
  const status = $("settings-status");
  const values = {};
  for (const name of SETTINGS) {
    const raw = $(`setting-${name}`).value.trim();
    values[name] = raw === "" ? null : Number(raw); // the server names what is wrong with a null
  }
  clearErrors(section);
  setStatus(status, "Saving…", "busy");
  let project;
  try {
    project = await api("PATCH", `/projects/${projectId}`, { settings: values });
  } catch (err) {
    const { first } = showErrors(section, fieldErrors(err, "settings"));
    setStatus(status, "Not saved: see the marked fields.", "error");
    if (first) first.focus();
    return;
  }
  showSettings(project.settings);
  setStatus(status, "Settings saved.", "ok");
});

// --- start ---------------------------------------------------------------------------------------------

async function start() {
  try {
    const project = await api("GET", `/projects/${projectId}`);
    editor.load(project.label_schema, project.schema_version);
    showSettings(project.settings);
    await Promise.all([loadMembers(), dashboard.refresh()]);
  } catch (err) {
    $("load-error").textContent = `This page could not load everything: ${err.message} Reload to try again.`;
    $("load-error").hidden = false;
  }
  root.dataset.loaded = "true";
}

start();
