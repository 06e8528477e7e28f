"""A project's label schema: validated and normalised on save, and compared with the schema it replaces."""

from __future__ import annotations

import json
import re
from types import MappingProxyType
from typing import Any, Iterator

TOOLS = ("bbox", "polygon", "point", "polyline", "mask")
QUESTION_TYPES = ("single", "multiple")

MAX_CLASSES = 200
MAX_QUESTIONS = 50
MAX_NAME_LENGTH = 64
MIN_OPTIONS, MAX_OPTIONS = 2, 100
MAX_OPTION_LENGTH = 128
# Compact UTF-8 JSON. Generous for real schemas (200 classes take ~20 KiB) yet small enough that every
# page of the workspace can embed the schema; it is tighter than the per-field limits multiplied out.
MAX_SCHEMA_BYTES = 256 * 1024

# Keys the labeling workspace binds for itself, so no class may take them as its hotkey. Keys outside
# [0-9a-z] (space, "?", "+", "-", arrows, Delete) are never class hotkeys, so they are free for the
# workspace without being listed. Digits stay free: they are the natural class keys.
RESERVED_HOTKEYS = MappingProxyType({
    "a": "accept (review)",
    "r": "reject (review)",
    "s": "save draft",
    "n": "next frame",
    "p": "previous frame",
    "z": "undo",
    "y": "redo",
    "f": "fit image to window",
    "h": "hide or show shapes",
    "w": "window/level drag",
    "v": "select and move tool",
    "b": "box tool",
    "g": "polygon tool",
    "l": "polyline tool",
    "t": "point tool",
    "m": "mask brush tool",
    "e": "mask eraser tool",
    "c": "correct and accept (review)",
})

CLASS_KEYS = ("name", "color", "hotkey", "tools")
QUESTION_KEYS = ("name", "type", "options", "required")
_COLOR_RE = re.compile(r"#[0-9a-fA-F]{6}")
_HOTKEY_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyz")
_MISSING = object()


class SchemaError(ValueError):
    """A schema that cannot be saved; `.errors` lists every problem as {"field": path, "message": text}."""

    def __init__(self, errors: list[dict[str, str]]):
        super().__init__(errors)  # the list in args, so the exception pickles with its errors
        self.errors = errors

    def __str__(self) -> str:
        return summarise("label schema", self.errors)


def summarise(what: str, errors: list[dict[str, Any]]) -> str:
    """One line naming the first few problems of a list of {"field", "message"} errors."""
    shown = "; ".join(f"{e['field'] or '(whole)'}: {e['message']}" for e in errors[:5])
    more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
    return f"{len(errors)} problem(s) in the {what}: {shown}{more}"


def encoded_size(value: object) -> int | None:
    """Bytes of `value` as compact UTF-8 JSON, or None when it cannot be encoded (a cycle, a vast int)."""
    try:
        # Values that are not JSON (bytes, sets, NaN) are counted as placeholders here: the field checks
        # reject them with a path, which a failed json.dumps could not give.
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), skipkeys=True,
                          default=lambda _: None)
    except (TypeError, ValueError, RecursionError):
        return None
    return len(text.encode("utf-8", "surrogatepass"))


def key_path(base: str, key: object) -> str:
    """The path of `key` inside the object at `base`: "classes[0].name", or classes[0]['odd key']."""
    if isinstance(key, str) and key.isidentifier():
        return f"{base}.{key}" if base else key
    return f"{base}[{key!r}]"


def check_text(value: object, max_length: int) -> str | None:
    """Why `value` is not a clean name of 1..max_length printable characters, or None when it is one."""
    if not isinstance(value, str):
        return "must be a string"
    if not 1 <= len(value) <= max_length:
        return f"must be 1 to {max_length} characters"
    # isprintable() also refuses NUL and lone surrogates, which PostgreSQL's JSONB cannot store.
    if not value.isprintable():
        return "must contain only printable characters (no control characters or line breaks)"
    if value != value.strip():
        return "must not start or end with whitespace"
    return None


class _Errors(list):
    """Problems collected while walking a schema."""

    def add(self, field: str, message: str) -> None:
        self.append({"field": field, "message": message})

    def unknown_keys(self, obj: dict, known: tuple[str, ...], base: str) -> None:
        for key in obj:
            if key not in known:
                self.add(key_path(base, key), f"unknown key; allowed: {', '.join(known)}")


def validate_schema(raw: object) -> dict[str, Any]:
    """A normalised copy of a label schema (defaults filled in), or SchemaError listing every problem."""
    size = encoded_size(raw)
    if size is None:
        raise SchemaError([{"field": "", "message": "is not JSON (a cycle or a number too large)"}])
    if size > MAX_SCHEMA_BYTES:
        raise SchemaError([{"field": "", "message": f"is {size} bytes as JSON; at most {MAX_SCHEMA_BYTES}"}])
    if not isinstance(raw, dict):
        raise SchemaError([{"field": "", "message": "must be a JSON object with classes and questions"}])
    errors = _Errors()
    errors.unknown_keys(raw, ("classes", "questions"), "")
    class_names: dict[str, str] = {}
    classes = _classes(raw.get("classes", _MISSING), errors, class_names)
    questions = _questions(raw.get("questions", []), errors, class_names)
    if errors:
        raise SchemaError(list(errors))
    return {"classes": classes, "questions": questions}


def _list(value: object, path: str, errors: _Errors, what: str, low: int, high: int) -> list:
    """`value` as a list to walk (empty when it is not one), with its length checked against low..high."""
    if value is _MISSING:
        errors.add(path, f"is required: a list of {what}")
        return []
    if not isinstance(value, list):
        errors.add(path, f"must be a list of {what}")
        return []
    if not low <= len(value) <= high:
        errors.add(path, f"must hold {low} to {high} {what}; it holds {len(value)}")
    return value


def _unique_name(value: object, path: str, errors: _Errors, seen: dict[str, str]) -> str | None:
    """A checked name, remembered case-insensitively in `seen` (folded name -> path of its first use)."""
    if value is _MISSING:
        errors.add(path, "is required")
        return None
    problem = check_text(value, MAX_NAME_LENGTH)
    if problem:
        errors.add(path, problem)
        return None
    folded = value.casefold()
    if folded in seen:
        errors.add(path, f"repeats the name at {seen[folded]} (names are compared ignoring case)")
    else:
        seen[folded] = path
    return str(value)


def _classes(value: object, errors: _Errors, names: dict[str, str]) -> list[dict[str, Any]]:
    hotkeys: dict[str, str] = {}
    result = []
    for i, item in enumerate(_list(value, "classes", errors, "classes", 1, MAX_CLASSES)):
        path = f"classes[{i}]"
        if not isinstance(item, dict):
            errors.add(path, "must be an object")
            continue
        errors.unknown_keys(item, CLASS_KEYS, path)
        result.append({
            "name": _unique_name(item.get("name", _MISSING), f"{path}.name", errors, names),
            "color": _color(item.get("color", _MISSING), f"{path}.color", errors),
            "hotkey": _hotkey(item.get("hotkey"), f"{path}.hotkey", errors, hotkeys),
            "tools": _tools(item.get("tools", _MISSING), f"{path}.tools", errors),
        })
    return result


def _color(value: object, path: str, errors: _Errors) -> str | None:
    if isinstance(value, str) and _COLOR_RE.fullmatch(value):
        return value.lower()
    errors.add(path, "is required" if value is _MISSING else "must be a colour written #rrggbb")
    return None


def _hotkey(value: object, path: str, errors: _Errors, seen: dict[str, str]) -> str | None:
    if value is None:
        return None
    # isascii() first: some non-ASCII letters lower-case into ASCII (the Kelvin sign becomes "k").
    if not (isinstance(value, str) and len(value) == 1 and value.isascii()
            and value.lower() in _HOTKEY_CHARS):
        errors.add(path, "must be one character 0-9 or a-z, or null for none")
        return None
    key = value.lower()
    if key in RESERVED_HOTKEYS:
        errors.add(path, f"{key!r} is reserved by the workspace ({RESERVED_HOTKEYS[key]})")
    elif key in seen:
        errors.add(path, f"{key!r} is already the hotkey at {seen[key]}")
    else:
        seen[key] = path
    return key


def _tools(value: object, path: str, errors: _Errors) -> list[str]:
    tools: list[str] = []
    for j, tool in enumerate(_list(value, path, errors, "tools", 1, len(TOOLS))):
        if not isinstance(tool, str) or tool not in TOOLS:
            errors.add(f"{path}[{j}]", f"must be one of {', '.join(TOOLS)}")
        elif tool in tools:
            errors.add(f"{path}[{j}]", f"{tool!r} is listed twice")
        else:
            tools.append(str(tool))
    return tools


def _questions(value: object, errors: _Errors, class_names: dict[str, str]) -> list[dict[str, Any]]:
    names: dict[str, str] = {}
    result = []
    for i, item in enumerate(_list(value, "questions", errors, "questions", 0, MAX_QUESTIONS)):
        path = f"questions[{i}]"
        if not isinstance(item, dict):
            errors.add(path, "must be an object")
            continue
        errors.unknown_keys(item, QUESTION_KEYS, path)
        name = _unique_name(item.get("name", _MISSING), f"{path}.name", errors, names)
        # Exports and the review filters list classes and questions side by side, so one name may not
        # mean both.
        if name is not None and name.casefold() in class_names:
            errors.add(f"{path}.name", f"is also the class name at {class_names[name.casefold()]}")
        kind = item.get("type", _MISSING)
        if kind not in QUESTION_TYPES:
            errors.add(f"{path}.type",
                       "is required" if kind is _MISSING else "must be 'single' or 'multiple'")
        required = item.get("required", False)
        if not isinstance(required, bool):
            errors.add(f"{path}.required", "must be true or false")
        result.append({"name": name, "type": kind, "options": _options(item, path, errors),
                       "required": required is True})
    return result


def _options(item: dict, path: str, errors: _Errors) -> list[str]:
    seen: dict[str, str] = {}
    options = []
    for j, option in enumerate(_list(item.get("options", _MISSING), f"{path}.options", errors, "options",
                                     MIN_OPTIONS, MAX_OPTIONS)):
        field = f"{path}.options[{j}]"
        problem = check_text(option, MAX_OPTION_LENGTH)
        if problem:
            errors.add(field, problem)
        elif option.casefold() in seen:
            errors.add(field, f"repeats the option at {seen[option.casefold()]} (compared ignoring case)")
        else:
            seen[option.casefold()] = field
            options.append(str(option))
    return options


# --- comparing two schemas -------------------------------------------------------------------------

def schema_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Lines for people saying what changed from `old` to `new` (validated schemas; {} is the empty one)."""
    return [line for line, _ in _changes(old, new)]


def breaking_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The changes that leave annotations saved under `old` invalid under `new`; empty when none do."""
    if not old.get("classes"):
        return []  # the empty schema of a new project hands out no tasks, so no annotation exists to break
    return [line for line, breaking in _changes(old, new) if breaking]


def _by_name(entries: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in entries or []}


def _changes(old: dict[str, Any], new: dict[str, Any]) -> Iterator[tuple[str, bool]]:
    """(line, breaking) pairs. Names are identities: annotations hold the exact class name in `label` and
    the question name as a key, so a rename (even of case alone) is a removal plus an addition."""
    old_classes, new_classes = _by_name(old.get("classes")), _by_name(new.get("classes"))
    yield from _added_removed("class", old_classes, new_classes)
    for name in new_classes.keys() & old_classes.keys():
        yield from _class_changes(name, old_classes[name], new_classes[name])
    yield from _reordered("classes", old_classes, new_classes)
    old_questions, new_questions = _by_name(old.get("questions")), _by_name(new.get("questions"))
    yield from _added_removed("question", old_questions, new_questions)
    for name in new_questions.keys() & old_questions.keys():
        yield from _question_changes(name, old_questions[name], new_questions[name])
    yield from _reordered("questions", old_questions, new_questions)


def _added_removed(what: str, old: dict[str, dict], new: dict[str, dict]) -> Iterator[tuple[str, bool]]:
    for name in old:
        if name not in new:
            yield f"{what} {name!r} removed", True
    for name in new:
        if name not in old:
            # A new required question leaves accepted work without an answer the schema now demands.
            required = new[name].get("required", False)
            yield f"{what} {name!r} added" + (" (required)" if required else ""), required


def _reordered(what: str, old: dict[str, dict], new: dict[str, dict]) -> Iterator[tuple[str, bool]]:
    if [n for n in old if n in new] != [n for n in new if n in old]:
        yield f"{what} reordered", False


def _listed(values: list[str]) -> str:
    return ", ".join(repr(v) for v in values)


def _class_changes(name: str, old: dict, new: dict) -> Iterator[tuple[str, bool]]:
    if old["color"] != new["color"]:
        yield f"class {name!r}: colour {old['color']} -> {new['color']}", False
    if old.get("hotkey") != new.get("hotkey"):
        yield f"class {name!r}: hotkey {old.get('hotkey') or 'none'} -> {new.get('hotkey') or 'none'}", False
    removed = [t for t in old["tools"] if t not in new["tools"]]
    added = [t for t in new["tools"] if t not in old["tools"]]
    if removed:
        yield f"class {name!r}: tools removed: {_listed(removed)}", True
    if added:
        yield f"class {name!r}: tools added: {_listed(added)}", False


def _question_changes(name: str, old: dict, new: dict) -> Iterator[tuple[str, bool]]:
    if old["type"] != new["type"]:
        yield f"question {name!r}: type {old['type']} -> {new['type']}", True
    removed = [o for o in old["options"] if o not in new["options"]]
    added = [o for o in new["options"] if o not in old["options"]]
    if removed:
        yield f"question {name!r}: options removed: {_listed(removed)}", True
    if added:
        yield f"question {name!r}: options added: {_listed(added)}", False
    kept_old = [o for o in old["options"] if o in new["options"]]
    if kept_old != [o for o in new["options"] if o in old["options"]]:
        yield f"question {name!r}: options reordered", False
    if old.get("required", False) != new.get("required", False):
        now_required = bool(new.get("required"))
        yield f"question {name!r}: now {'required' if now_required else 'optional'}", now_required
