"""A project's workflow settings: validated on save, read with defaults."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from onprem_label.db.models import Project
from onprem_label.workflow.errors import Invalid


@dataclass(frozen=True)
class ProjectSettings:
    """Review rate (full inspection by default), lease length, rounds before escalation, stacking."""

    review_rate: float = 1.0
    lease_minutes: int = 30
    max_rounds: int = 3
    stack_series: bool = False


LIMITS = {"review_rate": (0.01, 1.0), "lease_minutes": (1, 24 * 60), "max_rounds": (1, 100)}


def validate_settings(raw: Any) -> dict[str, Any]:
    """A complete settings dict from a partial one, or Invalid naming every bad field."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise Invalid("settings must be an object.", errors=[{"field": "settings", "message": "not an object"}])
    problems, values = [], asdict(ProjectSettings())
    for key, value in raw.items():
        if key not in values:
            problems.append({"field": f"settings.{key}", "message": "unknown setting"})
            continue
        expected = type(values[key])
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not expected or (expected is float and not math.isfinite(value)):
            problems.append({"field": f"settings.{key}", "message": f"expected {expected.__name__}"})
            continue
        low, high = LIMITS.get(key, (None, None))
        if low is not None and not low <= value <= high:
            problems.append({"field": f"settings.{key}", "message": f"must be from {low} to {high}"})
            continue
        values[key] = value
    if problems:
        raise Invalid("Invalid project settings.", errors=problems)
    return values


def project_settings(project: Project) -> ProjectSettings:
    """The project's settings with defaults for anything missing (older projects)."""
    known = {k: v for k, v in (project.settings or {}).items() if k in ProjectSettings.__dataclass_fields__}
    return ProjectSettings(**known)
