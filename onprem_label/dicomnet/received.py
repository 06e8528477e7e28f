"""Preparing one received instance in an isolated worker process, straight from its bytes."""

from __future__ import annotations

import io

from onprem_label.imaging.errors import Rejected
from onprem_label.imaging.isolation import decode_deadline
from onprem_label.imaging.prepare import Prepared, PrepareOptions, prepare_or_reject


def prepare_received(data: bytes, options: PrepareOptions, digest: str) -> Prepared | Rejected:
    """Worker: decode and de-identify an instance as received (the parent seals a copy meanwhile)."""
    try:
        with decode_deadline(options.decode_timeout):
            return prepare_or_reject(io.BytesIO(data), options, digest=digest)
    except Rejected as exc:
        return exc


def warm_up() -> None:
    """Worker: nothing; submitted once per worker at start so the first caller does not wait for spawning."""
