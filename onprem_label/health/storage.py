"""The storage check: blob files against Blob rows, and blobs authenticated (all or a sample)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from onprem_label.db.models import Blob
from onprem_label.health.findings import OK, PROBLEM, WARNING, Finding
from onprem_label.storage import BlobNotFound, EncryptedBlobStore, IntegrityError

CHECK = "storage"


@dataclass
class StorageReport:
    """What a storage check found; `ok` when nothing."""

    temp_leftovers: list[str] = field(default_factory=list)
    orphan_blobs: list[str] = field(default_factory=list)
    missing_blobs: list[str] = field(default_factory=list)
    corrupt_blobs: list[tuple[str, str]] = field(default_factory=list)
    checked: int = 0
    stored: int = 0
    removed_temp: int = 0

    @property
    def ok(self) -> bool:
        """True when no fault was found (removed temp files no longer count)."""
        return not (self.temp_leftovers or self.orphan_blobs or self.missing_blobs
                    or self.corrupt_blobs)

    def lines(self) -> list[str]:
        """One line per finding, for the terminal."""
        out = [f"temp leftover: {name}" for name in self.temp_leftovers]
        out += [f"blob with no database row: {b}" for b in self.orphan_blobs]
        out += [f"database row with no blob: {b}" for b in self.missing_blobs]
        out += [f"blob fails authentication: {b} ({why})" for b, why in self.corrupt_blobs]
        return out

    def findings(self, sampled: bool) -> list[Finding]:
        """The report as doctor findings: one per fault, or one ok line.

        Temp leftovers and blobs without a row are warnings: a running server has both for a
        moment while it writes (the file is renamed into place before its row commits). A row
        without its blob and a blob that fails authentication are problems: data is lost.
        """
        out = [Finding(CHECK, WARNING, f"temp leftover: {name}") for name in self.temp_leftovers]
        out += [Finding(CHECK, WARNING, f"blob with no database row: {b}") for b in self.orphan_blobs]
        out += [Finding(CHECK, PROBLEM, f"database row with no blob: {b}") for b in self.missing_blobs]
        out += [Finding(CHECK, PROBLEM, f"blob fails authentication: {b} ({why})") for b, why in self.corrupt_blobs]
        if self.removed_temp:
            out.insert(0, Finding(CHECK, OK, f"removed {self.removed_temp} temp leftovers (--repair)"))
        if not self.ok:
            return out
        which = (f"a random sample of {self.checked} of {self.stored} blobs authenticated ('--storage' checks all)"
                 if sampled and self.checked < self.stored else f"{self.checked} blobs authenticated")
        return out + [Finding(CHECK, OK, f"{which}; every blob file has its row and every row its file")]


TEMP_GRACE_SECONDS = 3600  # --repair removes only temp files older than this


def _age_seconds(path) -> float:
    """Seconds since `path` was last written (0 when it vanished meanwhile)."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def check_storage(db: Session, store: EncryptedBlobStore, *, sample: int | None = None,
                  repair: bool = False, seed: int | None = None) -> StorageReport:
    """Compare blob files with Blob rows and authenticate blobs (all, or a random sample).

    With `repair`, temp leftovers older than an hour are removed (they are never referenced;
    younger ones may belong to a writer still at work); everything else is
    only reported, because deleting a blob or a row could lose data a person must look at.
    Under tmp/ only plain files are removed: put() never makes anything else, so a folder or a
    link there was put by a person and is reported, as is a file that cannot be removed.
    """
    report = StorageReport()
    for temp in store.iter_temp():
        if not repair:
            report.temp_leftovers.append(temp.name)
        elif temp.is_symlink() or not temp.is_file():
            report.temp_leftovers.append(f"{temp.name} (not a plain file; left alone)")
        elif _age_seconds(temp) < TEMP_GRACE_SECONDS:
            # An upload or ingest still writing it would fail at its final link.
            report.temp_leftovers.append(f"{temp.name} (younger than an hour, perhaps still being written; "
                                         "left alone)")
        else:
            try:
                temp.unlink(missing_ok=True)
            except OSError as exc:
                report.temp_leftovers.append(f"{temp.name} (cannot remove: {exc.strerror})")
            else:
                report.removed_temp += 1
    # Rows first, then the files: a blob is linked into place before its row commits, so a blob
    # stored between the two reads is at worst a file without a row (a warning), never a row
    # without a file (a problem) on a busy but healthy server.
    in_db = set(db.scalars(select(Blob.id)))
    on_disk = set(store.iter_blobs())
    report.orphan_blobs = sorted(on_disk - in_db)
    report.missing_blobs = sorted(in_db - on_disk)
    to_check = sorted(on_disk)
    report.stored = len(to_check)
    if sample is not None and sample < len(to_check):
        to_check = sorted(random.Random(seed).sample(to_check, sample))
    for blob_id in to_check:
        try:
            store.verify(blob_id)
        except IntegrityError as exc:
            report.corrupt_blobs.append((blob_id, str(exc)))
        except BlobNotFound:
            report.missing_blobs.append(blob_id)
        report.checked += 1
    return report
