"""PS3.15 Table E.1-1 actions per DICOM tag, taken from dicom-anonymizer's maintained copy of the table."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version
from types import ModuleType

import dicomanonymizer.dicom_anonymization_databases as _databases

# The package's list names -> the action codes of PS3.15 Table E.1-1. Every list must be present:
# a category renamed upstream would otherwise drop its tags without anyone noticing.
CATEGORIES: dict[str, str] = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}
ACTIONS = frozenset(CATEGORIES.values())
# Names in the table modules that are not categories of their own.
_NOT_CATEGORIES = {"ALL_TAGS"}
_PREFIX = "dicomfields_"


class TableError(ValueError):
    """The de-identification table is malformed or contradicts itself."""


@dataclass(frozen=True)
class ActionTable:
    """Exact tags -> action, plus masked entries (value, mask, action) for repeating groups."""

    exact: Mapping[int, str]
    masked: tuple[tuple[int, int, str], ...]

    def action_for(self, tag: int) -> str | None:
        """The Table E.1-1 action for `tag`, or None when the table does not list it."""
        found = self.exact.get(int(tag))
        if found is not None:
            return found
        for value, mask, action in self.masked:
            if int(tag) & mask == value:
                return action
        return None

    def counts(self) -> dict[str, int]:
        """How many entries (exact and masked) carry each action."""
        result = dict.fromkeys(sorted(ACTIONS), 0)
        for action in list(self.exact.values()) + [m[2] for m in self.masked]:
            result[action] += 1
        return result


def table_versions() -> list[str]:
    """Names of the table modules installed with dicom-anonymizer, oldest first."""
    names = [m.name for m in pkgutil.iter_modules(_databases.__path__) if m.name.startswith(_PREFIX)]
    if not names:
        raise TableError("dicom-anonymizer ships no dicomfields_* table")
    return sorted(names)


def _entry(raw: object, category: str) -> tuple[int, int]:
    """(value, mask) of one table entry; 2-tuples are exact (mask all ones)."""
    ok = isinstance(raw, tuple) and len(raw) in (2, 4)
    ok = ok and all(isinstance(x, int) and 0 <= x <= 0xFFFF for x in raw)  # type: ignore[union-attr]
    if not ok:
        raise TableError(f"{category}: malformed entry {raw!r}")
    group, element = raw[0], raw[1]  # type: ignore[index]
    mask = 0xFFFFFFFF if len(raw) == 2 else (raw[2] << 16) | raw[3]  # type: ignore[arg-type, index]
    return ((group << 16) | element) & mask, mask


def _categories(module: ModuleType) -> dict[str, list]:
    """The category lists of `module`, refusing unknown or missing categories."""
    present = {n for n in vars(module) if n.endswith("_TAGS") and n not in _NOT_CATEGORIES}
    unknown, missing = present - CATEGORIES.keys(), CATEGORIES.keys() - present
    if unknown or missing:
        raise TableError(f"{module.__name__}: unknown categories {sorted(unknown)}, "
                         f"missing {sorted(missing)}")
    return {name: list(getattr(module, name)) for name in CATEGORIES}


def load_table(module: ModuleType) -> ActionTable:
    """Build the lookup from a dicomfields_* module; raise TableError if one tag gets two actions."""
    entries: dict[tuple[int, int], str] = {}
    for category, raw_entries in _categories(module).items():
        action = CATEGORIES[category]
        for raw in raw_entries:
            key = _entry(raw, category)
            if entries.setdefault(key, action) != action:
                raise TableError(f"({key[0] >> 16:04X},{key[0] & 0xFFFF:04X}) is both "
                                 f"{entries[key]} and {action}")
    exact = {value: a for (value, mask), a in entries.items() if mask == 0xFFFFFFFF}
    masked = tuple((value, mask, a) for (value, mask), a in entries.items() if mask != 0xFFFFFFFF)
    for tag, action in exact.items():
        for value, mask, other in masked:
            if tag & mask == value and other != action:
                raise TableError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) is {action} but its "
                                 f"repeating group says {other}")
    return ActionTable(exact=exact, masked=masked)


TABLE_VERSION = table_versions()[-1]
TABLE = load_table(importlib.import_module(f"{_databases.__name__}.{TABLE_VERSION}"))
TABLE_SOURCE = (f"DICOM PS3.15 Table E.1-1 (Basic Application Level Confidentiality Profile), "
                f"dicom-anonymizer {version('dicom-anonymizer')} {TABLE_VERSION}")


def action_for(tag: int) -> str | None:
    """The action of the installed newest table for `tag` ("X", "Z", "D", "U", "X/Z", ...) or None."""
    return TABLE.action_for(tag)
