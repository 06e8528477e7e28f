"""What `ingest PATH...` reads: files, folders (recursively) and members of zip archives."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from onprem_label.imaging import errors
from onprem_label.imaging.errors import Rejected


@dataclass(frozen=True)
class Source:
    """One file to ingest: a path, or a member of a zip archive; `problem` if it cannot be read."""

    name: str  # for the report: the path, or "archive.zip!member"
    path: str
    member: str | None = None
    problem: Rejected | None = None


@dataclass(frozen=True)
class ZipLimits:
    """Bounds on one archive, against zip bombs and runaway jobs."""

    max_files: int
    max_bytes: int


def iter_sources(paths: list[str], limits: ZipLimits) -> Iterator[Source]:
    """Every file under `paths`, in a stable order; zip archives are opened, never extracted."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from _walk(path, limits)
        elif path.is_file():
            yield from _file(path, limits)
        else:
            yield Source(raw, raw, problem=Rejected(errors.UNREADABLE, "no such file or folder"))


def _walk(folder: Path, limits: ZipLimits) -> Iterator[Source]:
    # Symlinked folders are not followed (a loop would never end); symlinked files are read.
    for root, dirs, files in os.walk(folder, onerror=None, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            yield from _file(Path(root) / name, limits)


def _file(path: Path, limits: ZipLimits) -> Iterator[Source]:
    if not path.name.lower().endswith(".zip") or not zipfile.is_zipfile(path):
        yield Source(str(path), str(path))
        return
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        yield Source(str(path), str(path), problem=Rejected(errors.CORRUPT, f"unreadable zip archive ({exc})"))
        return
    total = sum(m.file_size for m in members)
    if len(members) > limits.max_files:
        problem = Rejected(errors.TOO_LARGE, f"zip archive holds {len(members)} files, more than the limit "
                                             f"of {limits.max_files} (ingest_zip_max_files)")
    elif total > limits.max_bytes:
        problem = Rejected(errors.TOO_LARGE, f"zip archive unpacks to {total} bytes, more than the limit "
                                             f"of {limits.max_bytes} (ingest_zip_max_bytes)")
    else:
        problem = None
    if problem is not None:
        yield Source(str(path), str(path), problem=problem)
        return
    for member in sorted(members, key=lambda m: m.filename):
        yield Source(f"{path}!{member.filename}", str(path), member.filename)


def open_source(source: Source) -> BinaryIO:
    """A seekable binary stream of the source (a zip member is decompressed as it is read)."""
    if source.member is None:
        try:
            return open(source.path, "rb")
        except OSError as exc:
            raise Rejected(errors.UNREADABLE, f"cannot read the file ({exc.strerror})") from None
    try:
        archive = zipfile.ZipFile(source.path)
        info = archive.getinfo(source.member)
        if info.flag_bits & 0x1:
            archive.close()
            raise Rejected(errors.UNSUPPORTED_FORMAT, "encrypted zip member")
        stream = archive.open(info)
    except (zipfile.BadZipFile, OSError, KeyError, NotImplementedError, RuntimeError) as exc:
        raise Rejected(errors.CORRUPT, f"unreadable zip member ({type(exc).__name__})") from None
    return _ZipMember(stream, archive)


class _ZipMember:
    """A zip member stream that also closes its archive; seeking restarts decompression."""

    def __init__(self, stream, archive: zipfile.ZipFile):
        self._stream, self._archive = stream, archive

    def read(self, size: int = -1) -> bytes:
        """Decompressed bytes; a corrupt member raises Rejected."""
        try:
            return self._stream.read(size)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise Rejected(errors.CORRUPT, f"corrupt zip member ({type(exc).__name__})") from None

    def seek(self, offset: int, whence: int = 0) -> int:
        """Seek (zipfile re-reads from the start to go back)."""
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        """Position in the decompressed member."""
        return self._stream.tell()

    def seekable(self) -> bool:
        """Always: zipfile emulates seeking."""
        return True

    def close(self) -> None:
        """Close the member and its archive."""
        self._stream.close()
        self._archive.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
