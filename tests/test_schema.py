"""Label schemas: every rule refuses its bad case by field path, normalisation, and change detection."""

from __future__ import annotations

import copy
import pickle

import pytest

from onprem_label.workflow.schema import (MAX_CLASSES, MAX_QUESTIONS, RESERVED_HOTKEYS, TOOLS, SchemaError,
                                          breaking_changes, schema_changes, validate_schema)

RICH = {
    "classes": [
        {"name": "lesion", "color": "#FF0000", "hotkey": "1", "tools": ["bbox", "polygon"]},
        {"name": "vessel", "color": "#00ff00", "hotkey": "K", "tools": ["polyline", "point"]},
        {"name": "organ", "color": "#0000ff", "tools": ["mask"]},
        {"name": "Über-Läsion 2", "color": "#123abc", "hotkey": None, "tools": list(TOOLS)},
    ],
    "questions": [
        {"name": "quality", "type": "single", "options": ["good", "poor"], "required": True},
        {"name": "findings", "type": "multiple", "options": ["calcification", "mass", "none"]},
    ],
}


def _schema(**changes) -> dict:
    """A deep copy of RICH with top-level keys replaced."""
    schema = copy.deepcopy(RICH)
    schema.update(changes)
    return schema


def _errors(raw) -> list[dict]:
    with pytest.raises(SchemaError) as caught:
        validate_schema(raw)
    return caught.value.errors


def test_rich_schema_is_normalised():
    """A valid schema comes back with colours and hotkeys lower-cased and every default filled in."""
    assert validate_schema(RICH) == {
        "classes": [
            {"name": "lesion", "color": "#ff0000", "hotkey": "1", "tools": ["bbox", "polygon"]},
            {"name": "vessel", "color": "#00ff00", "hotkey": "k", "tools": ["polyline", "point"]},
            {"name": "organ", "color": "#0000ff", "hotkey": None, "tools": ["mask"]},
            {"name": "Über-Läsion 2", "color": "#123abc", "hotkey": None, "tools": list(TOOLS)},
        ],
        "questions": [
            {"name": "quality", "type": "single", "options": ["good", "poor"], "required": True},
            {"name": "findings", "type": "multiple", "options": ["calcification", "mass", "none"],
             "required": False},
        ],
    }


def test_questions_default_to_none_and_input_is_not_touched():
    """Without questions the schema gets an empty list; the caller's dict is left as it was."""
    raw = {"classes": [{"name": "a1", "color": "#aaaaaa", "hotkey": "K", "tools": ["bbox"]}]}
    before = copy.deepcopy(raw)
    result = validate_schema(raw)
    assert result["questions"] == [] and result["classes"][0]["hotkey"] == "k"
    result["classes"][0]["tools"].append("mask")
    assert raw == before


def test_demo_schema_is_valid():
    """The demo project's schema passes the rules it will be edited under."""
    from onprem_label.demo import DEMO_SCHEMA
    assert validate_schema(DEMO_SCHEMA)["classes"][0]["name"] == "nodule"


def test_reserved_hotkeys_are_keys_a_class_could_otherwise_take():
    """Every reserved hotkey is a lower-case letter or digit, and says what the workspace does with it."""
    assert all(len(k) == 1 and k in "0123456789abcdefghijklmnopqrstuvwxyz" for k in RESERVED_HOTKEYS)
    assert all(RESERVED_HOTKEYS.values())
    assert not set("0123456789") & set(RESERVED_HOTKEYS)


@pytest.mark.parametrize("value", [
    pytest.param("x" * 64, id="name-64-chars"),
    pytest.param("a b", id="inner-space"),
    pytest.param("肺结节", id="non-ascii"),
])
def test_boundary_names_are_valid(value):
    """Names up to 64 printable characters, with inner spaces or non-ASCII letters, are accepted."""
    schema = _schema()
    schema["classes"][0]["name"] = value
    schema["questions"][0]["options"][0] = value + "!"
    assert validate_schema(schema)["classes"][0]["name"] == value


def test_largest_lists_are_valid():
    """200 classes, 50 questions and 100 options of 128 characters fit (under the size cap)."""
    classes = [{"name": f"c{i}", "color": "#000000", "tools": ["bbox"]} for i in range(MAX_CLASSES)]
    questions = [{"name": f"q{i}", "type": "single", "options": ["yes", "no"]} for i in range(MAX_QUESTIONS)]
    questions[0]["options"] = [f"{i:03d}" + "o" * 125 for i in range(100)]
    result = validate_schema({"classes": classes, "questions": questions})
    assert len(result["classes"]) == MAX_CLASSES and len(result["questions"][0]["options"][0]) == 128


def _set(path: str, value):
    """A mutation that sets RICH[path] (dotted, with list indexes) to value."""
    def mutate(schema):
        *parents, last = path.split(".")
        target = schema
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        if last.isdigit():
            target[int(last)] = value
        else:
            target[last] = value
    return mutate


def _drop(path: str):
    """A mutation that deletes RICH[path]."""
    def mutate(schema):
        *parents, last = path.split(".")
        target = schema
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        del target[last]
    return mutate


def _cycle(schema):
    schema["classes"].append(schema)


BAD = [
    # top level
    ("top-unknown-key", _set("extra", 1), "extra", "unknown key"),
    ("classes-missing", _drop("classes"), "classes", "required"),
    ("classes-empty", _set("classes", []), "classes", "1 to 200"),
    ("classes-tuple", _set("classes", tuple(RICH["classes"])), "classes", "must be a list"),
    ("classes-201", _set("classes", [{"name": f"c{i}", "color": "#000000", "tools": ["bbox"]}
                                     for i in range(201)]), "classes", "1 to 200"),
    ("class-not-object", _set("classes.0", "lesion"), "classes[0]", "must be an object"),
    ("class-unknown-key", _set("classes.0.colour", "#ff0000"), "classes[0].colour", "unknown key"),
    ("class-odd-key", _set("classes.0.a b", 1), "classes[0]['a b']", "unknown key"),
    # names
    ("name-missing", _drop("classes.0.name"), "classes[0].name", "required"),
    ("name-empty", _set("classes.0.name", ""), "classes[0].name", "1 to 64"),
    ("name-65", _set("classes.0.name", "x" * 65), "classes[0].name", "1 to 64"),
    ("name-newline", _set("classes.0.name", "a\nb"), "classes[0].name", "printable"),
    ("name-nul", _set("classes.0.name", "a\x00b"), "classes[0].name", "printable"),
    ("name-surrogate", _set("classes.0.name", "a\ud800"), "classes[0].name", "printable"),
    ("name-edge-space", _set("classes.0.name", " lesion"), "classes[0].name", "whitespace"),
    ("name-bytes", _set("classes.0.name", b"lesion"), "classes[0].name", "must be a string"),
    ("name-number", _set("classes.0.name", 7), "classes[0].name", "must be a string"),
    ("name-duplicate-case", _set("classes.1.name", "LESION"), "classes[1].name",
     "repeats the name at classes[0]"),
    # colours
    ("color-missing", _drop("classes.0.color"), "classes[0].color", "required"),
    ("color-word", _set("classes.0.color", "red"), "classes[0].color", "#rrggbb"),
    ("color-short", _set("classes.0.color", "#ff000"), "classes[0].color", "#rrggbb"),
    ("color-not-hex", _set("classes.0.color", "#gg0000"), "classes[0].color", "#rrggbb"),
    ("color-trailing-newline", _set("classes.0.color", "#ff0000\n"), "classes[0].color", "#rrggbb"),
    ("color-nan", _set("classes.0.color", float("nan")), "classes[0].color", "#rrggbb"),
    # hotkeys
    ("hotkey-two-chars", _set("classes.0.hotkey", "10"), "classes[0].hotkey", "one character"),
    ("hotkey-empty", _set("classes.0.hotkey", ""), "classes[0].hotkey", "one character"),
    ("hotkey-int", _set("classes.0.hotkey", 1), "classes[0].hotkey", "one character"),
    ("hotkey-symbol", _set("classes.0.hotkey", "?"), "classes[0].hotkey", "one character"),
    ("hotkey-space", _set("classes.0.hotkey", " "), "classes[0].hotkey", "one character"),
    ("hotkey-accented", _set("classes.0.hotkey", "é"), "classes[0].hotkey", "one character"),
    ("hotkey-kelvin-sign", _set("classes.0.hotkey", "\u212a"), "classes[0].hotkey", "one character"),
    ("hotkey-reserved", _set("classes.0.hotkey", "z"), "classes[0].hotkey",
     "reserved by the workspace (undo)"),
    ("hotkey-reserved-upper", _set("classes.0.hotkey", "A"), "classes[0].hotkey", "reserved"),
    ("hotkey-duplicate", _set("classes.1.hotkey", "1"), "classes[1].hotkey",
     "already the hotkey at classes[0]"),
    ("hotkey-duplicate-case", _set("classes.0.hotkey", "k"), "classes[1].hotkey", "already the hotkey"),
    # tools
    ("tools-missing", _drop("classes.0.tools"), "classes[0].tools", "required"),
    ("tools-empty", _set("classes.0.tools", []), "classes[0].tools", "1 to 5"),
    ("tools-string", _set("classes.0.tools", "bbox"), "classes[0].tools", "must be a list"),
    ("tools-unknown", _set("classes.0.tools", ["bbox", "brush"]), "classes[0].tools[1]", "must be one of"),
    ("tools-bool", _set("classes.0.tools", [True]), "classes[0].tools[0]", "must be one of"),
    ("tools-bytes", _set("classes.0.tools", [b"bbox"]), "classes[0].tools[0]", "must be one of"),
    ("tools-duplicate", _set("classes.0.tools", ["bbox", "bbox"]), "classes[0].tools[1]", "listed twice"),
    # questions
    ("questions-object", _set("questions", {"quality": {}}), "questions", "must be a list"),
    ("questions-51", _set("questions", [{"name": f"q{i}", "type": "single", "options": ["a", "b"]}
                                        for i in range(51)]), "questions", "0 to 50"),
    ("question-not-object", _set("questions.0", None), "questions[0]", "must be an object"),
    ("question-unknown-key", _set("questions.0.help", "?"), "questions[0].help", "unknown key"),
    ("question-name-missing", _drop("questions.0.name"), "questions[0].name", "required"),
    ("question-name-long", _set("questions.0.name", "q" * 65), "questions[0].name", "1 to 64"),
    ("question-name-duplicate", _set("questions.1.name", "Quality"), "questions[1].name", "repeats the name"),
    ("question-named-like-class", _set("questions.0.name", "Lesion"), "questions[0].name",
     "also the class name at classes[0].name"),
    ("type-missing", _drop("questions.0.type"), "questions[0].type", "required"),
    ("type-unknown", _set("questions.0.type", "text"), "questions[0].type", "'single' or 'multiple'"),
    ("type-list", _set("questions.0.type", ["single"]), "questions[0].type", "'single' or 'multiple'"),
    ("options-missing", _drop("questions.0.options"), "questions[0].options", "required"),
    ("options-one", _set("questions.0.options", ["good"]), "questions[0].options", "2 to 100"),
    ("options-101", _set("questions.0.options", [str(i) for i in range(101)]), "questions[0].options",
     "2 to 100"),
    ("option-empty", _set("questions.0.options.1", ""), "questions[0].options[1]", "1 to 128"),
    ("option-129", _set("questions.0.options.1", "o" * 129), "questions[0].options[1]", "1 to 128"),
    ("option-number", _set("questions.0.options.1", 2), "questions[0].options[1]", "must be a string"),
    ("option-tab", _set("questions.0.options.1", "a\tb"), "questions[0].options[1]", "printable"),
    ("option-duplicate", _set("questions.0.options.1", "GOOD"), "questions[0].options[1]",
     "repeats the option"),
    ("required-string", _set("questions.0.required", "yes"), "questions[0].required", "true or false"),
    ("required-int", _set("questions.0.required", 1), "questions[0].required", "true or false"),
    ("required-nan", _set("questions.0.required", float("nan")), "questions[0].required", "true or false"),
    ("required-null", _set("questions.0.required", None), "questions[0].required", "true or false"),
    # the whole document
    ("too-large", _set("classes.0.name", "x" * (256 * 1024)), "", "bytes as JSON; at most 262144"),
    ("cycle", _cycle, "", "not JSON"),
    ("vast-int", _set("questions.0.required", 10 ** 5000), "", "not JSON"),
]


@pytest.mark.parametrize("mutate, field, fragment", [pytest.param(*c[1:], id=c[0]) for c in BAD])
def test_bad_schema_names_the_field(mutate, field, fragment):
    """Each broken rule is reported at its field path with a message that says what is wrong."""
    schema = _schema()
    mutate(schema)
    errors = _errors(schema)
    assert any(e["field"] == field and fragment in e["message"] for e in errors), errors


@pytest.mark.parametrize("raw", [[], "classes", None, 3, b"{}"], ids=repr)
def test_schema_that_is_not_an_object(raw):
    """Anything but a JSON object is refused as a whole."""
    assert _errors(raw) == [{"field": "", "message": "must be a JSON object with classes and questions"}]


def test_every_problem_is_listed_at_once():
    """One save reports all problems, across classes and questions, not just the first."""
    schema = _schema()
    schema["classes"][0]["color"] = "red"
    schema["classes"][2]["hotkey"] = "r"
    schema["classes"][3]["tools"] = []
    schema["questions"][1]["type"] = "free"
    schema["questions"][1]["options"] = ["x"]
    schema["surprise"] = True
    fields = [e["field"] for e in _errors(schema)]
    assert fields == ["surprise", "classes[0].color", "classes[2].hotkey", "classes[3].tools",
                      "questions[1].type", "questions[1].options"]


def test_schema_error_reads_well_and_pickles():
    """SchemaError is a ValueError whose text names fields, and it keeps its errors when pickled."""
    schema = _schema()
    schema["classes"][0]["color"] = "red"
    with pytest.raises(ValueError) as caught:
        validate_schema(schema)
    assert "classes[0].color" in str(caught.value)
    assert pickle.loads(pickle.dumps(caught.value)).errors == caught.value.errors


# --- changes ---------------------------------------------------------------------------------------

def _rename_class(schema):
    schema["classes"][0]["name"] = "tumour"


def _swap_classes(schema):
    schema["classes"][0], schema["classes"][1] = schema["classes"][1], schema["classes"][0]


def _add_class(schema):
    schema["classes"].append({"name": "cyst", "color": "#ffffff", "tools": ["point"]})


def _add_question(required: bool):
    def mutate(schema):
        schema["questions"].append({"name": "side", "type": "single", "options": ["l", "r"],
                                    "required": required})
    return mutate


CHANGES = [
    ("class-added", _add_class, "class 'cyst' added", False),
    ("class-removed", lambda s: s["classes"].pop(2), "class 'organ' removed", True),
    ("class-renamed", _rename_class, "class 'lesion' removed", True),
    ("class-renamed-added", _rename_class, "class 'tumour' added", False),
    ("class-recoloured", _set("classes.0.color", "#00FFFF"), "class 'lesion': colour #ff0000 -> #00ffff",
     False),
    ("hotkey-changed", _set("classes.0.hotkey", "9"), "class 'lesion': hotkey 1 -> 9", False),
    ("hotkey-dropped", _set("classes.0.hotkey", None), "class 'lesion': hotkey 1 -> none", False),
    ("tool-added", _set("classes.0.tools", ["bbox", "polygon", "mask"]),
     "class 'lesion': tools added: 'mask'", False),
    ("tool-removed", _set("classes.0.tools", ["bbox"]), "class 'lesion': tools removed: 'polygon'", True),
    ("classes-reordered", _swap_classes, "classes reordered", False),
    ("question-added", _add_question(False), "question 'side' added", False),
    ("required-question-added", _add_question(True), "question 'side' added (required)", True),
    ("question-removed", lambda s: s["questions"].pop(0), "question 'quality' removed", True),
    ("single-to-multiple", _set("questions.0.type", "multiple"),
     "question 'quality': type single -> multiple", True),
    ("multiple-to-single", _set("questions.1.type", "single"), "question 'findings': type multiple -> single",
     True),
    ("option-added", _set("questions.0.options", ["good", "fair", "poor"]),
     "question 'quality': options added: 'fair'", False),
    ("option-removed", _set("questions.1.options", ["mass", "none"]),
     "question 'findings': options removed: 'calcification'", True),
    ("options-reordered", _set("questions.0.options", ["poor", "good"]),
     "question 'quality': options reordered", False),
    ("made-required", _set("questions.1.required", True), "question 'findings': now required", True),
    ("made-optional", _set("questions.0.required", False), "question 'quality': now optional", False),
]


@pytest.mark.parametrize("mutate, line, breaking", [pytest.param(*c[1:], id=c[0]) for c in CHANGES])
def test_change_is_described_and_classed(mutate, line, breaking):
    """Each kind of edit yields its line, which is listed as breaking exactly when old annotations break."""
    old = validate_schema(RICH)
    new = _schema()
    mutate(new)
    new = validate_schema(new)
    assert line in schema_changes(old, new)
    assert (line in breaking_changes(old, new)) is breaking
    assert set(breaking_changes(old, new)) <= set(schema_changes(old, new))


def test_unchanged_schema_has_no_changes():
    """Validating the same schema twice, or re-ordering nothing, reports no change at all."""
    assert schema_changes(validate_schema(RICH), validate_schema(copy.deepcopy(RICH))) == []
    assert breaking_changes(validate_schema(RICH), validate_schema(RICH)) == []


def test_first_schema_breaks_nothing():
    """From a new project's empty schema everything is added and nothing breaks (no work exists yet)."""
    new = validate_schema(RICH)
    changes = schema_changes({}, new)
    assert "class 'lesion' added" in changes and "question 'quality' added (required)" in changes
    assert breaking_changes({}, new) == []


def test_several_changes_are_all_reported():
    """A save that edits many things lists each one, breaking ones among them."""
    old = validate_schema(RICH)
    new = _schema()
    new["classes"].pop(1)
    new["classes"][0]["color"] = "#000000"
    new["questions"][0]["options"] = ["good", "poor", "unreadable"]
    new = validate_schema(new)
    assert schema_changes(old, new) == ["class 'vessel' removed", "class 'lesion': colour #ff0000 -> #000000",
                                        "question 'quality': options added: 'unreadable'"]
    assert breaking_changes(old, new) == ["class 'vessel' removed"]
