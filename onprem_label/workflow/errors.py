"""Workflow errors: each carries the HTTP status and code the web layer answers with."""

from __future__ import annotations

from typing import Any


class WorkflowError(Exception):
    """A request the workflow refuses; `extra` goes into the JSON error body."""

    status = 422
    code = "invalid"

    def __init__(self, message: str, **extra: Any):
        super().__init__(message)
        self.extra = extra


class NotFound(WorkflowError):
    """No such object, or one in a project the caller is not part of (no existence leak)."""

    status, code = 404, "not_found"


class Forbidden(WorkflowError):
    """The caller is in the project but their role does not allow this."""

    status, code = 403, "forbidden"


class Invalid(WorkflowError):
    """The body breaks a rule; `extra["errors"]` lists each problem with its field."""

    status, code = 422, "invalid"


class Conflict(WorkflowError):
    """The task is not in a state (or version, or lease) that allows this; body has its state."""

    status, code = 409, "conflict"


class IllegalTransition(Conflict):
    """The state machine has no such step from the task's current state."""

    code = "illegal_transition"


class StaleVersion(Conflict):
    """The request was based on an older version of the task."""

    code = "stale_version"


class LeaseLost(Conflict):
    """The caller does not hold a live lease on the task (expired, released or someone else's)."""

    code = "lease_lost"


class QualificationRequired(Forbidden):
    """The project asks for a passed qualification test before live work; `extra` says where the caller stands."""

    code = "qualification_required"
