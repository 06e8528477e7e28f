// DOM helpers of the project admin page: nodes built without innerHTML, and server errors placed by
// the field they name ({"field": "classes[0].hotkey", "message": ...}).

import { $, el } from "./dom.js";

export { $, el };

// A status line: text plus a kind ("ok" | "error" | "busy" | "") that styles it and that tests read.
export function setStatus(node, text, kind = "") {
  node.textContent = text;
  node.className = `status ${kind}`;
  node.dataset.kind = kind;
}

// "classes[0].tools[1]" -> "classes[0].tools" -> "classes[0]" -> "classes" -> "".
export function parentPath(path) {
  const match = /^(.*?)(\.[^.[\]]+|\[[^\]]*\])$/.exec(path);
  return match ? match[1] : "";
}

function slotFor(scope, path) {
  for (const slot of scope.querySelectorAll("[data-error-for]")) {
    if (slot.dataset.errorFor === path) return slot;
  }
  return null;
}

export function clearErrors(scope) {
  for (const slot of scope.querySelectorAll("[data-error-for]")) slot.replaceChildren();
  for (const input of scope.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
}

// Paths inside messages ("already the hotkey at classes[0].hotkey") in the words of the page: "class 1".
export function humanise(message) {
  return message
    .replace(/questions\[(\d+)\]\.options\[(\d+)\]/g, (_, q, o) => `question ${Number(q) + 1}, option ${Number(o) + 1}`)
    .replace(/(classes|questions)\[(\d+)\](\.\w+)?/g,
             (_, list, i) => `${list === "classes" ? "class" : "question"} ${Number(i) + 1}`);
}

// Where an error lands in a slot of an enclosing field, say which part it is about ("option 3: ...").
function describe(error, path, slot) {
  const rest = (error.field || "").slice(path.length);
  const index = /^\[(\d+)\]$/.exec(rest);
  const message = humanise(error.message);
  if (!rest) return message;
  if (index && slot.dataset.noun) return `${slot.dataset.noun} ${Number(index[1]) + 1}: ${message}`;
  return `${humanise(error.field)}: ${message}`;
}

// Put every error by its field, or by the nearest enclosing field that has a slot; returns the ones
// no slot in `scope` takes (the caller shows them in a general list). The first marked input is returned
// too, so the caller can move the focus there.
export function showErrors(scope, errors) {
  const unplaced = [];
  let first = null;
  for (const error of errors || []) {
    let path = error.field || "";
    let slot = slotFor(scope, path);
    while (!slot && path) {
      path = parentPath(path);
      slot = slotFor(scope, path);
    }
    if (!slot) {
      unplaced.push(error);
      continue;
    }
    slot.append(el("span", { class: "error-line" }, describe(error, path, slot)));
    const input = slot.dataset.input ? document.getElementById(slot.dataset.input) : null;
    if (input) {
      input.setAttribute("aria-invalid", "true");
      first = first || input;
    }
  }
  return { unplaced, first };
}
