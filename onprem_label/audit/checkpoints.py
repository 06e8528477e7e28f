"""Checkpoints: (event count, head hash, time, HMAC) lines appended to a file outside the database.

Cutting events off the tail of the chain leaves a shorter chain that verifies by itself; a
checkpoint taken earlier remembers how long the chain was. The file is append-only by use
(O_APPEND, one line per write, fsync'd) and can be copied off the machine or printed: an auditor
who keeps a checkpoint can later prove the log held at least that many events ending in that hash.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from onprem_label.audit.chain import checkpoint_mac, format_ts
from onprem_label.clock import utcnow


@dataclass(frozen=True)
class Checkpoint:
    """The chain had `count` events (ids 1..count) ending in `head`, at time `at`."""

    count: int
    head: str
    at: str
    mac: str

    def line(self) -> str:
        """The checkpoint as one JSON line (also the form printed for an auditor)."""
        return json.dumps({"count": self.count, "head": self.head, "at": self.at, "mac": self.mac},
                          separators=(",", ":"))

    def valid(self, key: bytes) -> bool:
        """True when the HMAC matches (the line was written with the audit key)."""
        from onprem_label.audit.verify import is_hex64, same

        return is_hex64(self.head) and same(self.mac, checkpoint_mac(key, self.count, self.head, self.at))


def make_checkpoint(key: bytes, count: int, head: str) -> Checkpoint:
    """A checkpoint of the chain's state now."""
    at = format_ts(utcnow())
    return Checkpoint(count, head, at, checkpoint_mac(key, count, head, at))


def parse_line(line: str) -> Checkpoint | None:
    """A checkpoint from one line, or None when the line is not one (a torn or foreign line)."""
    try:
        data = json.loads(line)
        return Checkpoint(int(data["count"]), str(data["head"]), str(data["at"]), str(data["mac"]))
    except (ValueError, KeyError, TypeError):
        return None


def read_checkpoint_file(path: Path) -> tuple[list[Checkpoint], int]:
    """(checkpoints in file order, count of lines that are not checkpoints); ([], 0) with no file."""
    if not path.exists():
        return [], 0
    good, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                checkpoint = parse_line(line)
                if checkpoint is None:
                    bad += 1
                else:
                    good.append(checkpoint)
    return good, bad


class CheckpointLog:
    """The checkpoint file of one data directory."""

    def __init__(self, path: Path, key: bytes) -> None:
        self.path, self._key, self._lock = Path(path), key, threading.Lock()
        self.last_written = float("-inf")  # time.monotonic() of this process's last write

    def write(self, count: int, head: str) -> Checkpoint:
        """Append a checkpoint and sync it to disk."""
        checkpoint = make_checkpoint(self._key, count, head)
        data = (checkpoint.line() + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.last_written = time.monotonic()
        return checkpoint

    def read(self) -> tuple[list[Checkpoint], int]:
        """(checkpoints in file order, count of lines that are not checkpoints)."""
        return read_checkpoint_file(self.path)
