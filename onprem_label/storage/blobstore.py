"""EncryptedBlobStore: content-named, encrypted, crash-safe blob files on a local filesystem."""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Protocol

from onprem_label.storage import format as fmt
from onprem_label.storage.durable import fsync_dir
from onprem_label.storage.format import IntegrityError
from onprem_label.storage.keyring import Keyring

BLOB_ID_RE = re.compile(r"^[0-9a-f]{64}$")
TEMP_SUFFIX = ".part"


class BlobNotFound(KeyError):
    """No blob with that id."""


class InvalidBlobId(ValueError):
    """A string that is not a blob id (never allowed near a path)."""


@dataclass(frozen=True)
class BlobRef:
    """What put() returns: the content-derived id and the plaintext size."""

    blob_id: str
    size: int


class BlobStore(Protocol):
    """The interface a storage backend offers (the filesystem store is the first)."""

    def put(self, stream: BinaryIO) -> BlobRef: ...
    def open(self, blob_id: str) -> BinaryIO: ...
    def delete(self, blob_id: str) -> bool: ...
    def exists(self, blob_id: str) -> bool: ...
    def verify(self, blob_id: str) -> int: ...
    def iter_blobs(self) -> Iterator[str]: ...


def check_blob_id(blob_id: str) -> str:
    """Return `blob_id` if it is 64 lowercase hex digits; raise InvalidBlobId otherwise."""
    if not isinstance(blob_id, str) or not BLOB_ID_RE.fullmatch(blob_id):
        raise InvalidBlobId("not a blob id")
    return blob_id


def iter_blob_ids(root: Path) -> Iterator[str]:
    """Blob ids stored under `root`, read from file names alone (no key needed)."""
    for first in sorted(Path(root).glob("[0-9a-f][0-9a-f]")):
        for second in sorted(first.glob("[0-9a-f][0-9a-f]")):
            for path in sorted(second.iterdir()):
                if BLOB_ID_RE.fullmatch(path.name) and path.name.startswith(first.name + second.name):
                    yield path.name


def private_opener(path, flags: int) -> int:
    """`open(..., opener=private_opener)`: a new file is readable by the service user alone (0600).

    Blob files are ciphertext, but their sizes and count are still nobody else's business.
    """
    return os.open(path, flags, 0o600)


class EncryptedBlobStore:
    """Blobs under `root/ab/cd/<id>`; temp files under `root/tmp`; see docs/storage-format.md."""

    def __init__(self, root: Path, keyring: Keyring, *, chunk_size: int = fmt.DEFAULT_CHUNK_SIZE):
        if not fmt.MIN_CHUNK_SIZE <= chunk_size <= fmt.MAX_CHUNK_SIZE:
            raise ValueError(f"chunk size must be {fmt.MIN_CHUNK_SIZE}..{fmt.MAX_CHUNK_SIZE} bytes")
        self.root = Path(root)
        self.keyring = keyring
        self.chunk_size = chunk_size
        self.tmp_dir = self.root / "tmp"
        self._name_key = keyring.purpose_key("blob-names")

    # -- paths ---------------------------------------------------------------------------------

    def path_of(self, blob_id: str) -> Path:
        """The file of a blob (two fan-out levels of 256 directories each)."""
        check_blob_id(blob_id)
        return self.root / blob_id[:2] / blob_id[2:4] / blob_id

    # -- writing -------------------------------------------------------------------------------

    def put(self, stream: BinaryIO) -> BlobRef:
        """Encrypt `stream` into the store; identical content is stored once. Streams, never spools.

        The file is written under tmp/, fsynced, then hard-linked into place (so the first of
        several concurrent writers of the same content wins and nobody overwrites), and the
        directory is fsynced: a crash leaves either no blob or the whole blob.
        """
        self.tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        master_id, master_key = self.keyring.current()
        data_key, salt = os.urandom(fmt.DATA_KEY_BYTES), os.urandom(fmt.SALT_BYTES)
        keys = fmt.BlobKeys(data_key, salt)
        namer = hmac.new(self._name_key, digestmod=hashlib.sha256)
        temp = self.tmp_dir / (os.urandom(16).hex() + TEMP_SUFFIX)
        try:
            # Unbuffered: every chunk goes to the kernel in one write, without another copy.
            with open(temp, "xb", buffering=0, opener=private_opener) as out:
                _write_all(out, bytes(fmt.HEADER_BYTES))  # the real header once the id is known
                size = _seal_stream(stream, out, keys.payload, salt, namer, self.chunk_size)
                blob_id = namer.digest()
                header = fmt.Header(self.chunk_size, master_id, salt,
                                    fmt.wrap_key(master_key, data_key), blob_id, b"")
                header = fmt.Header(**{**header.__dict__, "mac": keys.header_mac(header.signed_part())})
                out.seek(0)
                _write_all(out, header.to_bytes())
                os.fsync(out.fileno())
            ref = BlobRef(blob_id.hex(), size)
            final = self.path_of(ref.blob_id)
            final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                os.link(temp, final)
            except FileExistsError:
                pass  # same content already stored: keep the existing file
            else:
                fsync_dir(final.parent)
            return ref
        finally:
            temp.unlink(missing_ok=True)

    # -- reading -------------------------------------------------------------------------------

    def open(self, blob_id: str) -> BlobReader:
        """A seekable reader of the plaintext; header checked now, each chunk as it is read."""
        path = self.path_of(blob_id)
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            raise BlobNotFound(blob_id) from None
        try:
            return BlobReader(fh, blob_id, self.keyring)
        except BaseException:
            fh.close()
            raise

    def exists(self, blob_id: str) -> bool:
        """True when the blob's file is present (not verified)."""
        return self.path_of(blob_id).is_file()

    def delete(self, blob_id: str) -> bool:
        """Remove a blob; False if it was not there."""
        path = self.path_of(blob_id)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(path.parent)
        return True

    def verify(self, blob_id: str) -> int:
        """Read the whole blob, checking every chunk and that its content hashes to its id.

        Returns the size; raises IntegrityError (or BlobNotFound).
        """
        namer = hmac.new(self._name_key, digestmod=hashlib.sha256)
        with self.open(blob_id) as reader:
            while chunk := reader.read(self.chunk_size):
                namer.update(chunk)
            size = reader.size
        if not hmac.compare_digest(namer.hexdigest(), blob_id):
            raise IntegrityError("blob content does not match its id")
        return size

    # -- maintenance ---------------------------------------------------------------------------

    def iter_blobs(self) -> Iterator[str]:
        """Every stored blob id (files with other names are skipped; see iter_temp)."""
        return iter_blob_ids(self.root)

    def iter_temp(self) -> Iterator[Path]:
        """Leftover temp files (from a crash or a killed process)."""
        if self.tmp_dir.is_dir():
            yield from sorted(self.tmp_dir.iterdir())

    def read_header(self, blob_id: str) -> fmt.Header:
        """The parsed header of a stored blob (not authenticated)."""
        with open(self.path_of(blob_id), "rb") as fh:
            return fmt.parse_header(fh.read(fmt.HEADER_BYTES))

    def rewrite_header(self, blob_id: str, header: bytes) -> None:
        """Overwrite a blob's header in place and fsync (key rotation; see rotation journal)."""
        with open(self.path_of(blob_id), "r+b") as fh:
            fh.write(header)
            fh.flush()
            os.fsync(fh.fileno())


def _seal_stream(stream: BinaryIO, out: io.FileIO, aead, salt: bytes, namer, chunk_size: int) -> int:
    """Seal `stream` chunk by chunk onto `out`, feeding the plaintext to `namer`; the plaintext size."""
    first = _read_full(stream, chunk_size)
    if len(first) < chunk_size:  # the whole blob is one short chunk (most thumbnails, small files)
        namer.update(first)
        _write_all(out, fmt.seal_chunk(aead, salt, 0, True, first))
        return len(first)
    return _seal_chunks(stream, out, aead, salt, namer, first)


def _seal_chunks(stream: BinaryIO, out: io.FileIO, aead, salt: bytes, namer, first: bytes) -> int:
    """Seal a blob of one full chunk or more: `first`, then the rest of `stream`.

    Reads one chunk ahead (to know which chunk is the last) into two reused buffers and seals
    into a third, so memory stays at about four chunks whatever the size. The name HMAC of each
    chunk runs in a helper thread while this thread reads ahead, seals and writes (hashlib and
    AES-GCM both release the GIL on large buffers).
    """
    chunk_size = len(first)
    buffers = (bytearray(chunk_size), bytearray(chunk_size))
    sealed_buffer = memoryview(bytearray(chunk_size + fmt.TAG_BYTES))
    plain, index, size = memoryview(first), 0, 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-name") as hasher, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-sync") as syncer:
        writeback = _Writeback(out.fileno(), out.tell(), syncer)
        while True:
            hashed = hasher.submit(namer.update, plain)
            # chunk i >= 1 sits in buffers[(i - 1) % 2]; the one after it goes to the other buffer
            following = _read_into(stream, buffers[index % 2]) if len(plain) == chunk_size else 0
            sealed = sealed_buffer[:len(plain) + fmt.TAG_BYTES]
            fmt.seal_chunk_into(aead, salt, index, not following, plain, sealed)
            _write_all(out, sealed)
            writeback.wrote(len(sealed))
            hashed.result()  # its buffer is read into next
            size += len(plain)
            if not following:
                writeback.finish()
                return size
            plain, index = memoryview(buffers[index % 2])[:following], index + 1


def _read_full(stream: BinaryIO, size: int) -> bytes:
    """Read exactly `size` bytes unless the stream ends first (raw streams may return less)."""
    parts, remaining = [], size
    while remaining:
        part = stream.read(remaining)
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


def _read_into(stream: BinaryIO, buffer: bytearray) -> int:
    """Fill `buffer` from `stream` unless it ends first (raw streams may return less); bytes read."""
    view, got = memoryview(buffer), 0
    readinto = getattr(stream, "readinto", None)
    while got < len(buffer):
        if readinto is not None:
            count = readinto(view[got:])
        else:
            part = stream.read(len(buffer) - got)
            count = len(part) if part else 0
            view[got:got + count] = part
        if not count:
            break
        got += count
    return got


def _write_all(out: io.FileIO, data) -> None:
    """Write all of `data` to an unbuffered file (a raw write may take only part of it)."""
    view = memoryview(data)
    while view:
        view = view[out.write(view):]


_FADVISE = getattr(os, "posix_fadvise", None)  # not on every platform
_FDATASYNC = getattr(os, "fdatasync", os.fsync)  # macOS and Windows have only fsync


class _Writeback:
    """Get a large blob's pages to disk while the rest is still being sealed.

    Otherwise every page stays dirty in memory until the final fsync, which then has to start
    all of the writing and wait for the disk (and a virtual disk's host cache) to flush it.
    Two measures, both measured in bench/storage_put_parts.py:
    - every STEP bytes, POSIX_FADV_DONTNEED on the range just written: on Linux it starts
      asynchronous writeback (pages still dirty are not dropped); elsewhere it is only advice;
    - every SYNC_STEP bytes, an fdatasync in a helper thread (at most one in flight), so the
      device flushes while this thread seals. The final fsync in put() is still the one that
      makes the blob durable; an error from an early sync is raised by finish() and fails the
      put, because the kernel reports a writeback error to an fd only once and the final fsync
      might otherwise not see it.
    """

    STEP = 8 << 20
    SYNC_STEP = 32 << 20

    def __init__(self, fd: int, start: int, syncer: ThreadPoolExecutor):
        self._fd, self._started, self._written = fd, start, start
        self._synced_at, self._syncer, self._sync = start, syncer, None

    def wrote(self, count: int) -> None:
        """Record `count` more bytes written; start writeback or an early sync when due."""
        self._written += count
        if self._written - self._started >= self.STEP and _FADVISE is not None:
            try:
                _FADVISE(self._fd, self._started, self._written - self._started,
                         os.POSIX_FADV_DONTNEED)
            except OSError:
                pass  # only advice: a filesystem that refuses it leaves the work to the syncs
            self._started = self._written
        if self._written - self._synced_at >= self.SYNC_STEP:
            if self._sync is not None:
                if not self._sync.done():
                    return  # the disk is still busy with the last one; never queue up syncs
                self._sync.result()  # raises the early sync's error
            self._sync = self._syncer.submit(_FDATASYNC, self._fd)
            self._synced_at = self._written

    def finish(self) -> None:
        """Wait for an early sync still running; raise its error, if any."""
        if self._sync is not None:
            self._sync.result()


class BlobReader(io.RawIOBase):
    """Seekable plaintext view of one blob; every byte returned has been authenticated."""

    def __init__(self, fh: BinaryIO, blob_id: str, keyring: Keyring):
        super().__init__()
        self._fh = fh
        self._lock = threading.Lock()
        header = fmt.parse_header(fh.read(fmt.HEADER_BYTES))
        if header.blob_id.hex() != blob_id:
            raise IntegrityError("blob file carries another blob's id")
        keys = fmt.open_header(header, keyring.key_for(header.key_id))
        self._aead, self._salt, self.chunk_size = keys.payload, header.salt, header.chunk_size
        self._chunks, self.size = fmt.layout(os.fstat(fh.fileno()).st_size, self.chunk_size)
        self._pos = 0
        self._cached: tuple[int, bytes] | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def _chunk(self, index: int) -> bytes:
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        full = self.chunk_size + fmt.TAG_BYTES
        self._fh.seek(fmt.HEADER_BYTES + index * full)
        sealed = self._fh.read(full)
        plain = fmt.open_chunk(self._aead, self._salt, index, index == self._chunks - 1, sealed)
        self._cached = (index, plain)
        return plain

    def read(self, size: int = -1) -> bytes:
        with self._lock:
            if self.closed:
                raise ValueError("read from a closed blob")
            end = self.size if size is None or size < 0 else min(self.size, self._pos + size)
            if self._pos >= end:
                if self._pos >= self.size and self._chunks:
                    self._chunk(self._chunks - 1)  # EOF only after the last-chunk flag checks out
                return b""
            parts = []
            while self._pos < end:
                index, offset = divmod(self._pos, self.chunk_size)
                plain = self._chunk(index)
                piece = plain[offset:offset + end - self._pos]
                parts.append(piece)
                self._pos += len(piece)
            return b"".join(parts)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)

    def close(self) -> None:
        if not self.closed:
            self._fh.close()
        super().close()
