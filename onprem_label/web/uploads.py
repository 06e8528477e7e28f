"""Streamed multipart uploads: each file part goes straight into an encrypted staging store.

Werkzeug's form parser would spool large parts to plaintext temp files; an image must never
touch the disk unencrypted, so upload endpoints bypass it: the body is decoded here, part by
part, and every file part is sealed by EncryptedBlobStore.put as it arrives. Such endpoints
are listed in STREAMED_ENDPOINTS so that no other hook reads `request.form` first.
"""

from __future__ import annotations

import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from flask import abort, request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import NEED_DATA, Data, Epilogue, Field, File, MultipartDecoder

from onprem_label.storage import EncryptedBlobStore, Keyring
from onprem_label.web.context import services

STREAMED_ENDPOINTS = frozenset({"api.upload_items", "api.import_predictions"})
FORM_OVERHEAD = 1 << 20  # part headers and small fields around the files
MAX_PARTS = 10_000
_READ = 256 << 10
STAGING_DIR = "staging"
STALE_STAGING_SECONDS = 24 * 3600


class UploadTooLarge(Exception):
    """A file part went past the per-file limit (a 413)."""


class MalformedUpload(Exception):
    """The body is not well-formed multipart/form-data (a 400)."""


@dataclass(frozen=True)
class StagedFile:
    """One uploaded file, sealed in the staging store."""

    name: str
    blob_id: str
    size: int


def is_streamed_upload() -> bool:
    """True for requests to an endpoint that decodes its own multipart body."""
    return request.endpoint in STREAMED_ENDPOINTS


def limit_streamed_upload() -> None:
    """before_request (first): give upload endpoints their limit; refuse a too-long body unread."""
    if not is_streamed_upload() or request.method != "POST":
        return
    limit = services().settings.upload_max_file_bytes + FORM_OVERHEAD
    if request.content_length is not None and request.content_length > limit:
        abort(413, description=f"Upload larger than the limit of "
                               f"{services().settings.upload_max_file_bytes} bytes.")
    request.max_content_length = limit


@contextmanager
def staging_store(data_dir: Path, keyring: Keyring) -> Iterator[EncryptedBlobStore]:
    """A private encrypted store for one request's uploads, removed afterwards."""
    root = data_dir / STAGING_DIR / uuid.uuid4().hex
    try:
        yield EncryptedBlobStore(root, keyring)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def remove_stale_staging(data_dir: Path, now: float | None = None) -> int:
    """Remove staging folders a crashed process left (older than a day); how many went."""
    base, removed = data_dir / STAGING_DIR, 0
    now = time.time() if now is None else now
    if not base.is_dir():
        return 0
    for folder in base.iterdir():
        try:
            if folder.is_dir() and not folder.is_symlink() and now - folder.stat().st_mtime > STALE_STAGING_SECONDS:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        except OSError:
            continue
    return removed


def stage_files(staging: EncryptedBlobStore, max_file_bytes: int) -> list[StagedFile]:
    """Decode the request's multipart body, sealing each file part into `staging`."""
    content_type, options = parse_options_header(request.headers.get("Content-Type", ""))
    boundary = options.get("boundary", "")
    if content_type != "multipart/form-data" or not boundary:
        raise MalformedUpload("Send the files as multipart/form-data.")
    try:
        # No decoder memory limit: it buffers at most one read (_READ) plus a boundary, because
        # events are pulled before more is read; parts are bounded by the _PartReader limits.
        events = _Events(request.stream, MultipartDecoder(boundary.encode("latin-1"), None,
                                                          max_parts=MAX_PARTS))
        staged = []
        while not isinstance(event := events.next(), Epilogue):
            if isinstance(event, File):
                part = _PartReader(events, max_file_bytes)
                ref = staging.put(part)
                if event.filename or part.size:
                    staged.append(StagedFile(_safe_name(event.filename), ref.blob_id, ref.size))
            elif isinstance(event, Field):
                _PartReader(events, FORM_OVERHEAD).drain()
        return staged
    except (ValueError, UnicodeError) as exc:
        raise MalformedUpload(f"The multipart body is malformed ({exc}).") from None


def _safe_name(filename: str) -> str:
    # Only echoed back in the per-file result; never used as a path.
    return filename.replace("\\", "/").rsplit("/", 1)[-1][:255]


class _Events:
    """Pull-based multipart events read from the request stream as they are needed."""

    def __init__(self, stream: BinaryIO, decoder: MultipartDecoder):
        self._stream, self._decoder = stream, decoder

    def next(self):
        """The next event that is not NEED_DATA; ValueError on a truncated body."""
        while (event := self._decoder.next_event()) is NEED_DATA:
            try:
                chunk = self._stream.read(_READ)
            except RequestEntityTooLarge:
                raise UploadTooLarge("the upload is larger than allowed") from None
            self._decoder.receive_data(chunk or None)
        return event


class _PartReader:
    """A readable stream of one part's bytes, pulled from the multipart events on demand."""

    def __init__(self, events: _Events, limit: int):
        self._events, self._limit = events, limit
        self._buffer, self._done, self.size = bytearray(), False, 0

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes of the part (all of it for -1); b"" at its end."""
        while not self._done and (size < 0 or len(self._buffer) < size):
            event = self._events.next()
            if not isinstance(event, Data):
                raise ValueError("a part ended without its data")
            self.size += len(event.data)
            if self.size > self._limit:
                raise UploadTooLarge(f"a file is larger than the limit of {self._limit} bytes")
            self._buffer += event.data  # a bytearray: amortised appends
            self._done = not event.more_data
        if size < 0:
            size = len(self._buffer)
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out

    def drain(self) -> None:
        """Read and drop the rest of the part."""
        while self.read(_READ):
            pass
