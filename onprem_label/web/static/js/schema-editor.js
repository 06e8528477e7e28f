// The label schema editor: rows of classes and whole-image questions, a live preview drawn the way the
// labeling workspace draws its palette, and a save through PATCH whose field errors land by their fields.

import { api } from "./api.js";
import { $, clearErrors, el, setStatus, showErrors } from "./admin-dom.js";

const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
                 "#fabed4", "#469990", "#9a6324", "#800000"];
const HOTKEY_ORDER = "1234567890";
let nextKey = 0; // ids for inputs: stable for a row's life, unlike its index

function key(text) {
  return el("span", { class: "key" }, text);
}

// A labelled input with the slot its server errors go to; `noun` names list entries ("option 3: ...").
function field(id, labelText, input, errorPath, { wide = false, noun = null } = {}) {
  const error = el("p", { class: "field-error", id: `${id}-error`, "data-error-for": errorPath, "data-input": id,
                          "data-noun": noun });
  const described = [input.getAttribute("aria-describedby"), `${id}-error`].filter(Boolean).join(" ");
  input.setAttribute("aria-describedby", described);
  return el("div", { class: wide ? "field grow" : "field" }, el("label", { for: id }, labelText), input, error);
}

export class SchemaEditor {
  constructor({ projectId, tools, onSaved }) {
    this.projectId = projectId;
    this.tools = tools;
    this.onSaved = onSaved || (() => {});
    this.classes = [];
    this.questions = [];
    this.form = $("schema-form");
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.save();
    });
    this.form.addEventListener("input", () => this.changed());
    this.form.addEventListener("change", () => this.changed());
    $("add-class").addEventListener("click", () => this.addClass());
    $("add-question").addEventListener("click", () => this.addQuestion());
  }

  // --- the model -------------------------------------------------------------------------------------

  load(schema, version) {
    const classes = (schema && schema.classes) || [];
    const questions = (schema && schema.questions) || [];
    this.classes = classes.map((c) => ({ key: nextKey++, name: c.name, color: c.color, hotkey: c.hotkey || "",
                                         tools: new Set(c.tools) }));
    this.questions = questions.map((q) => ({ key: nextKey++, name: q.name, type: q.type,
                                             options: q.options.join("\n"), required: !!q.required }));
    if (!this.classes.length) this.classes.push(this.blankClass()); // a schema needs one class at least
    $("schema-version").value = String(version);
    this.form.dataset.version = String(version);
    this.renderRows();
  }

  blankClass() {
    const used = new Set(this.classes.map((c) => c.hotkey.toLowerCase()));
    const hotkey = [...HOTKEY_ORDER].find((k) => !used.has(k)) || "";
    return { key: nextKey++, name: "", color: PALETTE[this.classes.length % PALETTE.length], hotkey,
             tools: new Set(this.tools.slice(0, 2)) };
  }

  addClass() {
    this.classes.push(this.blankClass());
    this.renderRows();
    this.changed();
    document.getElementById(`c${this.classes.at(-1).key}-name`).focus();
  }

  addQuestion() {
    this.questions.push({ key: nextKey++, name: "", type: "single", options: "", required: false });
    this.renderRows();
    this.changed();
    document.getElementById(`q${this.questions.at(-1).key}-name`).focus();
  }

  remove(list, index, focusAfter) {
    list.splice(index, 1);
    this.renderRows();
    this.changed();
    focusAfter.focus(); // the removed row took the focused button with it
  }

  // What the server is sent: trimmed names and options, a missing hotkey as null, tools in their order.
  collect() {
    return {
      classes: this.classes.map((c) => ({ name: c.name.trim(), color: c.color, hotkey: c.hotkey.trim() || null,
                                          tools: this.tools.filter((t) => c.tools.has(t)) })),
      questions: this.questions.map((q) => ({ name: q.name.trim(), type: q.type,
                                              options: q.options.split("\n").map((o) => o.trim()).filter(Boolean),
                                              required: q.required })),
    };
  }

  changed() {
    this.renderPreview();
    setStatus($("schema-status"), "Unsaved changes.", "busy");
  }

  // --- the rows --------------------------------------------------------------------------------------

  renderRows() {
    clearErrors(this.form);
    $("class-rows").replaceChildren(...this.classes.map((c, i) => this.classRow(c, i)));
    $("question-rows").replaceChildren(...this.questions.map((q, i) => this.questionRow(q, i)));
    this.renderPreview();
  }

  classRow(cls, i) {
    const id = `c${cls.key}`;
    const path = `classes[${i}]`;
    const name = el("input", { id: `${id}-name`, maxlength: 64, value: cls.name, autocomplete: "off",
                               oninput: (e) => { cls.name = e.target.value; } });
    const color = el("input", { id: `${id}-color`, type: "color", value: cls.color,
                                oninput: (e) => { cls.color = e.target.value; } });
    const hotkey = el("input", { id: `${id}-hotkey`, maxlength: 1, size: 2, value: cls.hotkey, autocomplete: "off",
                                 class: "hotkey", "aria-describedby": "hotkey-help",
                                 oninput: (e) => { cls.hotkey = e.target.value; } });
    const tools = this.tools.map((tool) => el("label", { class: "inline" },
      el("input", { type: "checkbox", value: tool, checked: cls.tools.has(tool),
                    onchange: (e) => { if (e.target.checked) cls.tools.add(tool); else cls.tools.delete(tool); } }),
      ` ${tool}`));
    const remove = el("button", { type: "button", class: "secondary remove", "aria-label": `Remove class ${i + 1}`,
                                  onclick: () => this.remove(this.classes, i, $("add-class")) }, "Remove");
    return el("fieldset", { class: "schema-row", "data-class-row": i },
      el("legend", {}, `Class ${i + 1}`),
      el("div", { class: "row-fields" },
        field(`${id}-name`, "Name", name, `${path}.name`, { wide: true }),
        field(`${id}-color`, "Colour", color, `${path}.color`),
        field(`${id}-hotkey`, "Hotkey", hotkey, `${path}.hotkey`),
        el("fieldset", { class: "tools-field" }, el("legend", {}, "Tools"), ...tools,
           el("p", { class: "field-error", "data-error-for": `${path}.tools`, "data-noun": "tool" })),
        remove),
      el("p", { class: "field-error", "data-error-for": path }));
  }

  questionRow(question, i) {
    const id = `q${question.key}`;
    const path = `questions[${i}]`;
    const name = el("input", { id: `${id}-name`, maxlength: 64, value: question.name, autocomplete: "off",
                               oninput: (e) => { question.name = e.target.value; } });
    const type = el("select", { id: `${id}-type`, onchange: (e) => { question.type = e.target.value; } },
      el("option", { value: "single", selected: question.type === "single" }, "single choice"),
      el("option", { value: "multiple", selected: question.type === "multiple" }, "multiple choice"));
    const options = el("textarea", { id: `${id}-options`, rows: 3, "aria-describedby": "options-help",
                                     oninput: (e) => { question.options = e.target.value; } });
    options.value = question.options;
    const required = el("input", { id: `${id}-required`, type: "checkbox", checked: question.required,
                                   onchange: (e) => { question.required = e.target.checked; } });
    const remove = el("button", { type: "button", class: "secondary remove", "aria-label": `Remove question ${i + 1}`,
                                  onclick: () => this.remove(this.questions, i, $("add-question")) }, "Remove");
    return el("fieldset", { class: "schema-row", "data-question-row": i },
      el("legend", {}, `Question ${i + 1}`),
      el("div", { class: "row-fields" },
        field(`${id}-name`, "Name", name, `${path}.name`, { wide: true }),
        field(`${id}-type`, "Answer", type, `${path}.type`),
        field(`${id}-options`, "Options", options, `${path}.options`, { wide: true, noun: "option" }),
        el("div", { class: "field" }, el("label", { class: "inline", for: `${id}-required` }, required, " Required"),
           el("p", { class: "field-error", "data-error-for": `${path}.required`, "data-input": `${id}-required` })),
        remove),
      el("p", { class: "field-error", "data-error-for": path }));
  }

  // --- the preview: the workspace's class buttons and question form, from the unsaved rows --------------

  renderPreview() {
    const schema = this.collect();
    $("preview-classes").replaceChildren(...schema.classes.map((cls) => {
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = cls.color; // CSSOM, which the CSP allows (a style attribute it would not)
      const button = el("button", { type: "button", class: "cls", "aria-pressed": "false", "data-class": cls.name,
                                    title: `tools: ${cls.tools.join(", ") || "none"}` },
        swatch, cls.name || "(unnamed)", cls.hotkey ? key(cls.hotkey.toUpperCase()) : null);
      button.addEventListener("click", () => {
        for (const b of $("preview-classes").querySelectorAll("button")) b.setAttribute("aria-pressed", String(b === button));
      });
      return el("div", { class: "preview-class" }, button,
        el("span", { class: "preview-tools muted" }, cls.tools.join(", ") || "no tools"));
    }));
    $("preview-questions").replaceChildren(...schema.questions.map((q, qi) => {
      const options = q.options.map((option, oi) => {
        const id = `pv-q${qi}-o${oi}`;
        return el("label", { class: "inline", for: id },
          el("input", { id, type: q.type === "multiple" ? "checkbox" : "radio", name: `pv-q${qi}`, value: option }),
          ` ${option}`);
      });
      return el("fieldset", {}, el("legend", { class: q.required ? "required" : "" }, q.name || "(unnamed)"), ...options);
    }));
    $("preview-no-questions").hidden = schema.questions.length > 0;
  }

  // --- saving ------------------------------------------------------------------------------------------

  async save() {
    const status = $("schema-status");
    clearErrors(this.form);
    setStatus(status, "Saving…", "busy");
    const before = Number(this.form.dataset.version);
    let project;
    try {
      project = await api("PATCH", `/projects/${this.projectId}`, { label_schema: this.collect() });
    } catch (err) {
      const { first } = showErrors(this.form, (err.body && err.body.errors) || [{ field: "", message: err.message }]);
      const count = ((err.body && err.body.errors) || [1]).length;
      setStatus(status, `Not saved: ${count} problem${count === 1 ? "" : "s"}, marked at the fields.`, "error");
      if (first) first.focus();
      return;
    }
    this.load(project.label_schema, project.schema_version);
    setStatus(status, project.schema_version === before ? "Saved; nothing had changed."
      : `Saved as schema version ${project.schema_version}.`, "ok");
    this.onSaved(project);
  }
}
