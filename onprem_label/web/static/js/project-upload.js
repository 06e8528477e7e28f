// Upload into a project: XMLHttpRequest (fetch reports no upload progress) drives a <progress> bar, and the
// server's answer becomes a table with one row per file: imported, duplicate or rejected, and why.

import { $, el, setStatus } from "./admin-dom.js";
import { csrfToken } from "./api.js";

const STATUS_TEXT = { imported: "imported", duplicate: "already in the project", rejected: "rejected" };

function setProgress(percent) {
  const value = Math.max(0, Math.min(100, Math.round(percent)));
  $("upload-progress").value = value;
  $("upload-progress").textContent = `${value}%`;
  $("upload-percent").value = `${value}%`;
}

function parse(xhr) {
  try {
    return JSON.parse(xhr.responseText);
  } catch (err) {
    return null; // a proxy's HTML error page, say: the status alone tells what happened
  }
}

function resultRow(result) {
  const item = result.item_id
    ? el("a", { href: `/items/${Number(result.item_id)}` }, `Item ${Number(result.item_id)}`) : "–";
  const reason = [result.reason, result.needs_pixel_check ? "flagged for a manager's pixel check" : null]
    .filter(Boolean).join("; ");
  return el("tr", { "data-status": result.status },
    el("td", { class: "file-name" }, result.name || "(no name)"),
    el("td", { class: `result ${result.status}` }, STATUS_TEXT[result.status] || result.status),
    el("td", {}, item), el("td", {}, result.code || ""), el("td", {}, reason));
}

function summary(results) {
  const count = (status) => results.filter((r) => r.status === status).length;
  return `${results.length} file${results.length === 1 ? "" : "s"}: ${count("imported")} imported, `
    + `${count("duplicate")} already in the project, ${count("rejected")} rejected.`;
}

function failure(status, body) {
  const message = body && body.error && body.error.message;
  if (status === 413) {
    const said = message || "the upload is over the server's limit.";
    return `Too large: ${said}${/nothing/i.test(said) ? "" : " Nothing was imported."}`;
  }
  if (status === 401) return "Your session has ended: log in again, then upload again.";
  if (status === 0) return "The server cannot be reached; nothing is known to have been imported.";
  return message || `The server answered ${status}.`;
}

export function initUpload({ projectId, root, onDone }) {
  const form = $("upload-form");
  if (!form) return; // the caller may not upload (the page says why)
  const status = $("upload-status");
  const button = $("upload-start");
  const finish = (state, text, results) => {
    root.dataset.uploadState = state;
    button.disabled = false;
    setStatus(status, text, state === "done" ? "ok" : "error");
    if (results) {
      $("upload-results").tBodies[0].replaceChildren(...results.map(resultRow));
      $("upload-results-wrap").hidden = false;
    }
    onDone();
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const files = [...$("upload-files").files];
    if (!files.length) {
      setStatus(status, "Choose one or more files first.", "error");
      return;
    }
    const data = new FormData();
    for (const file of files) data.append("files", file, file.name);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/api/v1/projects/${projectId}/items`);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.setRequestHeader("X-CSRF-Token", csrfToken());
    xhr.upload.addEventListener("progress", (e) => { if (e.lengthComputable) setProgress((100 * e.loaded) / e.total); });
    xhr.upload.addEventListener("load", () => {
      setProgress(100);
      setStatus(status, "Sent; the server is de-identifying and importing…", "busy");
    });
    xhr.addEventListener("load", () => {
      const body = parse(xhr);
      const results = body && Array.isArray(body.results) ? body.results : null;
      if (xhr.status === 200 && results) finish("done", summary(results), results);
      else finish("error", results ? `${failure(xhr.status, body)} ${summary(results)}` : failure(xhr.status, body), results);
    });
    xhr.addEventListener("error", () => finish("error", failure(0, null), null));
    root.dataset.uploadState = "uploading";
    button.disabled = true;
    setProgress(0);
    $("upload-results-wrap").hidden = true;
    setStatus(status, `Uploading ${files.length} file${files.length === 1 ? "" : "s"}…`, "busy");
    xhr.send(data);
  });
}
