"""EncryptedBlobStore: round trips, ranged reads, tamper detection, ids, concurrency, crash leftovers."""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from onprem_label.storage import blobstore, rotation
from onprem_label.storage import format as fmt
from onprem_label.storage.blobstore import (BlobNotFound, BlobRef, EncryptedBlobStore, InvalidBlobId,
                                            check_blob_id)
from onprem_label.storage.format import HEADER_BYTES, TAG_BYTES, IntegrityError, key_id_of
from onprem_label.storage.keyring import Keyring

CHUNK = fmt.MIN_CHUNK_SIZE  # small chunks keep many-chunk blobs cheap
SEALED = CHUNK + TAG_BYTES
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 10 * CHUNK + 7]
BIG = 10 * CHUNK + 7  # 11 chunks, the last one 7 bytes

# Header layout of format v1 (docs/storage-format.md), byte offsets into the blob file.
MAGIC_AT, VERSION_AT, WRAP_AT, CHUNK_SIZE_AT, KEY_ID_AT = 0, 8, 9, 10, 14
SALT_AT = KEY_ID_AT + fmt.KEY_ID_BYTES
WRAPPED_LEN_AT = SALT_AT + fmt.SALT_BYTES
WRAPPED_AT = WRAPPED_LEN_AT + 1
BLOB_ID_AT = WRAPPED_AT + fmt.WRAPPED_KEY_BYTES
MAC_AT = BLOB_ID_AT + fmt.BLOB_ID_BYTES


def make_keyring(master: bytes | None = None, root: bytes | None = None) -> Keyring:
    """A keyring holding one master key."""
    master = master or os.urandom(32)
    return Keyring({key_id_of(master): master}, key_id_of(master), root or os.urandom(32))


@pytest.fixture
def store(tmp_path, keyring) -> EncryptedBlobStore:
    """An empty store with 1 KiB chunks."""
    return EncryptedBlobStore(tmp_path / "blobs", keyring, chunk_size=CHUNK)


def content(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating test content."""
    return random.Random(f"{seed}/{size}").randbytes(size)


def put_bytes(store: EncryptedBlobStore, data: bytes) -> str:
    """Store `data`, check the returned ref, return the blob id."""
    ref = store.put(io.BytesIO(data))
    assert ref == BlobRef(ref.blob_id, len(data))
    return ref.blob_id


def read_all(store: EncryptedBlobStore, blob_id: str) -> bytes:
    """The whole plaintext of a blob."""
    with store.open(blob_id) as reader:
        return reader.read()


def files_under(root: Path) -> list[Path]:
    """Every regular file below `root`."""
    return sorted(p for p in root.rglob("*") if p.is_file())


def chunk_span(index: int, size: int) -> tuple[int, int]:
    """File offsets [start, end) of sealed chunk `index` of a blob of `size` plaintext bytes."""
    count = max(1, -(-size // CHUNK))
    start = HEADER_BYTES + index * SEALED
    end = start + SEALED if index < count - 1 else HEADER_BYTES + (count - 1) * SEALED + (
        size - (count - 1) * CHUNK) + TAG_BYTES
    return start, end


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    """Flip one bit of a file in place."""
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1 << bit
    path.write_bytes(bytes(raw))


def assert_unreadable(store: EncryptedBlobStore, blob_id: str) -> None:
    """Both a full read and verify() raise IntegrityError."""
    with pytest.raises(IntegrityError):
        read_all(store, blob_id)
    with pytest.raises(IntegrityError):
        store.verify(blob_id)


def chunkwise(store: EncryptedBlobStore, blob_id: str, data: bytes) -> list[int] | None:
    """Read every chunk with a ranged read: the indexes that failed, or None if open failed.

    A read that succeeds must return exactly the original bytes of that range.
    """
    try:
        reader = store.open(blob_id)
    except IntegrityError:
        return None
    failed = []
    with reader:
        for index in range(max(1, -(-len(data) // CHUNK))):
            reader.seek(index * CHUNK)
            try:
                got = reader.read(CHUNK)
            except IntegrityError:
                failed.append(index)
                continue
            assert got == data[index * CHUNK:(index + 1) * CHUNK], f"chunk {index} returned wrong bytes"
    return failed


# --- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES)
def test_round_trip_whole_read(store, size):
    """put then open().read() returns the same bytes; ref.size and verify() give the size."""
    data = content(size)
    ref = store.put(io.BytesIO(data))
    assert ref.size == size
    assert check_blob_id(ref.blob_id) == ref.blob_id
    assert read_all(store, ref.blob_id) == data
    assert store.verify(ref.blob_id) == size
    with store.open(ref.blob_id) as reader:
        assert reader.size == size


@pytest.mark.parametrize("piece", [1, 7, CHUNK - 1, CHUNK + 1, 3 * CHUNK + 5])
@pytest.mark.parametrize("size", SIZES)
def test_round_trip_odd_sized_reads(store, size, piece):
    """Reading in pieces of odd sizes yields the content in order, then b'' at EOF."""
    data = content(size)
    blob_id = put_bytes(store, data)
    parts = []
    with store.open(blob_id) as reader:
        while part := reader.read(piece):
            assert len(part) <= piece
            parts.append(part)
        assert reader.read(piece) == b""
    assert b"".join(parts) == data


class TrickleStream:
    """A raw stream that returns at most `step` bytes per read (like a socket)."""

    def __init__(self, data: bytes, step: int):
        self._data, self._at, self._step = data, 0, step

    def read(self, size: int = -1) -> bytes:
        size = self._step if size < 0 else min(size, self._step)
        part = self._data[self._at:self._at + size]
        self._at += len(part)
        return part


@pytest.mark.parametrize("size", SIZES)
def test_short_reads_from_the_source_do_not_change_the_blob(store, size):
    """A source returning short reads stores the same blob (same id, one file) as a BytesIO."""
    data = content(size)
    first = store.put(io.BytesIO(data))
    second = store.put(TrickleStream(data, 100))
    assert first == second
    assert list(store.iter_blobs()) == [first.blob_id]
    assert read_all(store, first.blob_id) == data


@pytest.mark.parametrize("size", SIZES)
def test_ranged_reads_at_every_chunk_boundary(store, size):
    """Seeking to k*chunk-1, k*chunk, k*chunk+1 and reading across boundaries returns the right bytes."""
    data = content(size)
    blob_id = put_bytes(store, data)
    with store.open(blob_id) as reader:
        for k in range(size // CHUNK + 2):
            for start in (k * CHUNK - 1, k * CHUNK, k * CHUNK + 1):
                if start < 0:
                    continue
                for length in (1, 2, CHUNK - 1, CHUNK, CHUNK + 2, 3 * CHUNK):
                    assert reader.seek(start) == start
                    got = reader.read(length)
                    assert got == data[start:start + length], (start, length)
                    assert reader.tell() == start + len(got)


@pytest.mark.parametrize("size", [s for s in SIZES if s])
def test_seek_end_and_cur(store, size):
    """SEEK_END and SEEK_CUR are relative to the plaintext end and the current position."""
    data = content(size)
    blob_id = put_bytes(store, data)
    with store.open(blob_id) as reader:
        assert reader.seek(-1, io.SEEK_END) == size - 1
        assert reader.read() == data[-1:]
        back = min(size, CHUNK + 1)
        assert reader.seek(-back, io.SEEK_END) == size - back
        assert reader.read(2) == data[size - back:size - back + 2]
        reader.seek(0)
        reader.read(min(size, 3))
        assert reader.seek(0, io.SEEK_CUR) == min(size, 3)
        assert reader.seek(-min(size, 3), io.SEEK_CUR) == 0
        assert reader.read() == data
        assert reader.seek(0, io.SEEK_END) == size
        with pytest.raises(ValueError):
            reader.seek(-size - 1, io.SEEK_END)


@pytest.mark.parametrize("size", SIZES)
def test_reading_at_or_past_eof_returns_empty(store, size):
    """At EOF or seeked beyond it, read() and read(n) return b'' (and do not fail)."""
    blob_id = put_bytes(store, content(size))
    with store.open(blob_id) as reader:
        for where in (size, size + 1, size + CHUNK, size + 100 * CHUNK):
            reader.seek(where)
            assert reader.read() == b""
            assert reader.read(10) == b""
            assert reader.tell() == where


def test_reader_works_with_stdlib_copy(store):
    """The reader is a file object: shutil.copyfileobj and BufferedReader read it whole."""
    data = content(BIG)
    blob_id = put_bytes(store, data)
    out = io.BytesIO()
    with store.open(blob_id) as reader:
        shutil.copyfileobj(reader, out, 777)
    assert out.getvalue() == data
    with io.BufferedReader(store.open(blob_id), buffer_size=300) as buffered:
        assert buffered.read() == data


def test_identical_content_has_one_id_and_one_file(store):
    """Putting the same content twice returns equal refs and keeps the first file untouched."""
    data = content(BIG)
    first = store.put(io.BytesIO(data))
    before = store.path_of(first.blob_id).stat()
    second = store.put(io.BytesIO(data))
    assert first == second
    after = store.path_of(first.blob_id).stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert files_under(store.root) == [store.path_of(first.blob_id)]
    assert list(store.iter_blobs()) == [first.blob_id]


def test_different_content_gets_different_ids(store):
    """Contents differing in one byte get different ids and files."""
    data = content(BIG)
    other = data[:-1] + bytes([data[-1] ^ 1])
    assert put_bytes(store, data) != put_bytes(store, other)
    assert len(list(store.iter_blobs())) == 2


def test_blob_id_is_a_keyed_hash(tmp_path):
    """The id is not the plain SHA-256 of the content and differs between keyrings (root keys)."""
    data = content(100)
    one = EncryptedBlobStore(tmp_path / "one", make_keyring(), chunk_size=CHUNK)
    two = EncryptedBlobStore(tmp_path / "two", make_keyring(), chunk_size=CHUNK)
    id_one, id_two = put_bytes(one, data), put_bytes(two, data)
    assert id_one != id_two
    assert hashlib.sha256(data).hexdigest() not in (id_one, id_two)


def test_blob_file_lives_at_fan_out_path(store):
    """A blob is stored as root/ab/cd/<id>, and its file is larger than its content (sealed)."""
    data = content(BIG)
    blob_id = put_bytes(store, data)
    path = store.root / blob_id[:2] / blob_id[2:4] / blob_id
    assert store.path_of(blob_id) == path
    assert path.stat().st_size == HEADER_BYTES + BIG + 11 * TAG_BYTES


def test_reader_uses_the_chunk_size_recorded_in_the_blob(tmp_path, keyring):
    """A store configured with another chunk size still reads (and verifies) older blobs."""
    data = content(BIG)
    blob_id = put_bytes(EncryptedBlobStore(tmp_path / "b", keyring, chunk_size=CHUNK), data)
    later = EncryptedBlobStore(tmp_path / "b", keyring, chunk_size=4 * CHUNK)
    assert read_all(later, blob_id) == data
    assert later.verify(blob_id) == BIG


@pytest.mark.parametrize("chunk_size", [0, fmt.MIN_CHUNK_SIZE - 1, fmt.MAX_CHUNK_SIZE + 1])
def test_impossible_chunk_size_is_refused(tmp_path, keyring, chunk_size):
    """A store cannot be made with a chunk size readers would reject."""
    with pytest.raises(ValueError):
        EncryptedBlobStore(tmp_path / "b", keyring, chunk_size=chunk_size)


def test_empty_blob_round_trips(store):
    """An empty stream stores a blob of size 0 (one sealed empty chunk) that reads back as b''."""
    blob_id = put_bytes(store, b"")
    assert store.path_of(blob_id).stat().st_size == HEADER_BYTES + TAG_BYTES
    assert read_all(store, blob_id) == b""
    assert store.verify(blob_id) == 0
    assert put_bytes(store, b"") == blob_id


def test_delete_and_exists(store):
    """exists() follows put/delete; delete returns True once, then False; other blobs stay."""
    keep, gone = put_bytes(store, content(10, 1)), put_bytes(store, content(10, 2))
    assert store.exists(gone) and store.exists(keep)
    assert store.delete(gone) is True
    assert not store.exists(gone)
    assert store.delete(gone) is False
    with pytest.raises(BlobNotFound):
        store.open(gone)
    assert list(store.iter_blobs()) == [keep]
    assert read_all(store, keep) == content(10, 1)


# --- tampering -------------------------------------------------------------------------------

HEADER_FIELDS = {
    "magic": MAGIC_AT, "magic-end": VERSION_AT - 1, "version": VERSION_AT, "wrap-algorithm": WRAP_AT,
    "chunk-size-high": CHUNK_SIZE_AT, "chunk-size-low": KEY_ID_AT - 1, "key-id": KEY_ID_AT,
    "key-id-end": SALT_AT - 1, "salt": SALT_AT, "salt-end": WRAPPED_LEN_AT - 1,
    "wrapped-length": WRAPPED_LEN_AT, "wrapped-key": WRAPPED_AT, "wrapped-key-end": BLOB_ID_AT - 1,
    "blob-id": BLOB_ID_AT, "blob-id-end": MAC_AT - 1, "mac": MAC_AT, "mac-end": HEADER_BYTES - 1,
}


def test_header_offsets_match_the_format():
    """The offsets these tests flip are those of format v1 (the header is 159 bytes)."""
    assert (fmt._FIXED.size, MAC_AT + fmt.MAC_BYTES) == (WRAPPED_AT, HEADER_BYTES)
    assert HEADER_BYTES == 159


@pytest.mark.parametrize("bit", [0, 7])
@pytest.mark.parametrize("offset", HEADER_FIELDS.values(), ids=HEADER_FIELDS.keys())
def test_header_bit_flip_is_detected(store, offset, bit):
    """One flipped bit anywhere in the header makes open, read and verify raise IntegrityError."""
    data = content(BIG)
    blob_id = put_bytes(store, data)
    flip_bit(store.path_of(blob_id), offset, bit)
    assert_unreadable(store, blob_id)
    with pytest.raises(IntegrityError):
        store.open(blob_id)


@pytest.mark.parametrize("size", [0, BIG])
def test_every_header_bit_is_covered(store, size):
    """Exhaustively: each of the 159*8 header bits, flipped alone, makes open() raise."""
    blob_id = put_bytes(store, content(size))
    path = store.path_of(blob_id)
    original = path.read_bytes()
    with open(path, "r+b") as fh:
        for offset in range(HEADER_BYTES):
            for bit in range(8):
                fh.seek(offset)
                fh.write(bytes([original[offset] ^ (1 << bit)]))
                fh.flush()
                with pytest.raises(IntegrityError):
                    store.open(blob_id).close()
                fh.seek(offset)
                fh.write(original[offset:offset + 1])
                fh.flush()
    assert path.read_bytes() == original
    assert read_all(store, blob_id) == content(size)


@pytest.mark.parametrize("where", ["first-byte", "middle", "last-ciphertext-byte", "tag-first",
                                   "tag-last"])
@pytest.mark.parametrize("index", [0, 1, 5, 9, 10])
def test_body_bit_flip_is_detected(store, index, where):
    """A bit flipped in a chunk's ciphertext or tag fails that chunk only; other chunks read right."""
    data = content(BIG)
    blob_id = put_bytes(store, data)
    start, end = chunk_span(index, BIG)
    offset = {"first-byte": start, "middle": (start + end - TAG_BYTES) // 2,
              "last-ciphertext-byte": end - TAG_BYTES - 1, "tag-first": end - TAG_BYTES,
              "tag-last": end - 1}[where]
    flip_bit(store.path_of(blob_id), offset, 3)
    assert_unreadable(store, blob_id)
    assert chunkwise(store, blob_id, data) == [index]


@pytest.mark.parametrize("offset", [HEADER_BYTES, HEADER_BYTES + TAG_BYTES - 1])
def test_empty_blob_tag_flip_is_detected(store, offset):
    """The tag of an empty blob's only chunk is checked even though there is nothing to read."""
    blob_id = put_bytes(store, b"")
    flip_bit(store.path_of(blob_id), offset)
    assert_unreadable(store, blob_id)


TRUNCATIONS = {
    "to-zero": 0, "to-one": 1, "mid-magic": 4, "mid-header": HEADER_BYTES // 2,
    "header-minus-one": HEADER_BYTES - 1, "header-only": HEADER_BYTES,
    "less-than-a-tag": HEADER_BYTES + TAG_BYTES - 1, "one-tag": HEADER_BYTES + TAG_BYTES,
    "after-chunk-1": HEADER_BYTES + SEALED, "after-chunk-5": HEADER_BYTES + 5 * SEALED,
    "before-last-chunk": HEADER_BYTES + 10 * SEALED,
    "mid-chunk-3": HEADER_BYTES + 3 * SEALED + 100, "inside-tag-of-chunk-2": HEADER_BYTES + 3 * SEALED - 5,
    "last-chunk-empty": HEADER_BYTES + 10 * SEALED + TAG_BYTES,
    "minus-one": HEADER_BYTES + 10 * SEALED + 7 + TAG_BYTES - 1,
}


@pytest.mark.parametrize("length", TRUNCATIONS.values(), ids=TRUNCATIONS.keys())
def test_truncation_is_detected(store, length):
    """A blob file cut at or between chunk boundaries (or inside the header) fails; no wrong bytes."""
    data = content(BIG)
    blob_id = put_bytes(store, data)
    path = store.path_of(blob_id)
    assert length < path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(length)
    assert_unreadable(store, blob_id)
    failed = chunkwise(store, blob_id, data)
    assert failed is None or failed, "some ranged read must notice the truncation"


@pytest.mark.parametrize("chunks", [1, 3])
def test_truncation_of_a_blob_with_full_chunks_is_detected(store, chunks):
    """Dropping the last chunk of a blob whose chunks are all full (size k*chunk) fails."""
    data = content(chunks * CHUNK)
    blob_id = put_bytes(store, data)
    with open(store.path_of(blob_id), "r+b") as fh:
        fh.truncate(HEADER_BYTES + (chunks - 1) * SEALED)
    assert_unreadable(store, blob_id)


@pytest.mark.parametrize("appended", ["copy-of-last", "copy-of-first", "garbage-1", "garbage-tag",
                                      "garbage-chunk"])
@pytest.mark.parametrize("size", [3 * CHUNK, BIG])
def test_appended_chunk_is_detected(store, size, appended):
    """Anything appended (a copied chunk or garbage) makes read and verify fail; no wrong bytes."""
    data = content(size)
    blob_id = put_bytes(store, data)
    path = store.path_of(blob_id)
    raw = path.read_bytes()
    count = -(-size // CHUNK)
    extra = {"copy-of-last": raw[slice(*chunk_span(count - 1, size))],
             "copy-of-first": raw[slice(*chunk_span(0, size))],
             "garbage-1": b"\0", "garbage-tag": os.urandom(TAG_BYTES),
             "garbage-chunk": os.urandom(SEALED)}[appended]
    path.write_bytes(raw + extra)
    assert_unreadable(store, blob_id)
    failed = chunkwise(store, blob_id, data)
    assert failed is None or count - 1 in failed


@pytest.mark.parametrize("size,first,second", [(BIG, 1, 2), (BIG, 0, 9), (3 * CHUNK, 0, 2),
                                               (3 * CHUNK, 1, 2)])
def test_swapped_chunks_are_detected(store, size, first, second):
    """Two equally long chunks swapped in place both fail; the rest still read right."""
    data = content(size)
    blob_id = put_bytes(store, data)
    path = store.path_of(blob_id)
    raw = bytearray(path.read_bytes())
    a, b = chunk_span(first, size), chunk_span(second, size)
    raw[a[0]:a[1]], raw[b[0]:b[1]] = raw[b[0]:b[1]], raw[a[0]:a[1]]
    path.write_bytes(bytes(raw))
    assert_unreadable(store, blob_id)
    assert chunkwise(store, blob_id, data) == [first, second]


@pytest.mark.parametrize("index", [0, 4, 10])
def test_chunk_from_another_blob_is_detected(store, index):
    """A chunk copied in from another blob of the same size (same position) fails to authenticate."""
    data, other = content(BIG, 1), content(BIG, 2)
    blob_id, other_id = put_bytes(store, data), put_bytes(store, other)
    path = store.path_of(blob_id)
    raw = bytearray(path.read_bytes())
    start, end = chunk_span(index, BIG)
    raw[start:end] = store.path_of(other_id).read_bytes()[start:end]
    path.write_bytes(bytes(raw))
    assert_unreadable(store, blob_id)
    assert chunkwise(store, blob_id, data) == [index]
    assert read_all(store, other_id) == other


def test_whole_blob_file_swapped_is_detected(store):
    """Another blob's file copied over this blob's path does not open as this blob."""
    data, other = content(BIG, 1), content(BIG, 2)
    blob_id, other_id = put_bytes(store, data), put_bytes(store, other)
    shutil.copyfile(store.path_of(other_id), store.path_of(blob_id))
    assert_unreadable(store, blob_id)
    assert chunkwise(store, blob_id, data) is None


def test_swapped_file_with_rewritten_id_is_detected(store):
    """Rewriting the swapped-in file's header id to this blob's id breaks the header MAC."""
    data, other = content(BIG, 1), content(BIG, 2)
    blob_id, other_id = put_bytes(store, data), put_bytes(store, other)
    raw = bytearray(store.path_of(other_id).read_bytes())
    raw[BLOB_ID_AT:MAC_AT] = bytes.fromhex(blob_id)
    store.path_of(blob_id).write_bytes(bytes(raw))
    assert_unreadable(store, blob_id)
    assert chunkwise(store, blob_id, data) is None


def test_verify_rejects_content_that_does_not_hash_to_its_id(store, keyring):
    """A validly sealed file whose content is not what its id names passes open but fails verify()."""
    data, claimed = content(100, 1), content(100, 2)
    claimed_id = put_bytes(store, claimed)
    store.delete(claimed_id)
    # Seal `data` under `claimed_id` with the real keys, as only a key holder could.
    master_id, master = keyring.current()
    data_key, salt = os.urandom(32), os.urandom(32)
    keys = fmt.BlobKeys(data_key, salt)
    header = fmt.Header(CHUNK, master_id, salt, fmt.wrap_key(master, data_key),
                        bytes.fromhex(claimed_id), b"")
    header = fmt.Header(**{**header.__dict__, "mac": keys.header_mac(header.signed_part())})
    body = fmt.seal_chunk(keys.payload, salt, 0, True, data)
    store.path_of(claimed_id).write_bytes(header.to_bytes() + body)
    assert read_all(store, claimed_id) == data  # authentic bytes, so open alone cannot tell
    with pytest.raises(IntegrityError, match="does not match its id"):
        store.verify(claimed_id)


# --- keys --------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, BIG])
def test_wrong_master_key_is_refused(tmp_path, keyring, size):
    """A keyring holding a different key under the blob's key id cannot open or verify it."""
    blob_id = put_bytes(EncryptedBlobStore(tmp_path / "b", keyring, chunk_size=CHUNK), content(size))
    key_id = keyring.current_id
    wrong = Keyring({key_id: os.urandom(32)}, key_id, keyring.root_key)
    other = EncryptedBlobStore(tmp_path / "b", wrong, chunk_size=CHUNK)
    assert_unreadable(other, blob_id)


def test_keyring_without_the_key_id_is_refused(tmp_path, keyring):
    """A keyring that does not hold the blob's key id raises IntegrityError naming the id."""
    blob_id = put_bytes(EncryptedBlobStore(tmp_path / "b", keyring, chunk_size=CHUNK), content(BIG))
    other = EncryptedBlobStore(tmp_path / "b", make_keyring(root=keyring.root_key), chunk_size=CHUNK)
    with pytest.raises(IntegrityError, match=keyring.current_id.hex()):
        other.open(blob_id)
    assert_unreadable(other, blob_id)


def test_a_second_held_key_still_opens_old_blobs(tmp_path, keyring):
    """A keyring holding the old key besides a new current one reads blobs sealed with the old key."""
    blob_id = put_bytes(EncryptedBlobStore(tmp_path / "b", keyring, chunk_size=CHUNK), content(BIG))
    new = os.urandom(32)
    both = Keyring({**keyring.masters, key_id_of(new): new}, key_id_of(new), keyring.root_key)
    assert read_all(EncryptedBlobStore(tmp_path / "b", both, chunk_size=CHUNK), blob_id) == content(BIG)


# --- concurrency -------------------------------------------------------------------------------

@pytest.mark.parametrize("round_", range(3))
def test_eight_threads_putting_the_same_content(store, round_):
    """Eight simultaneous puts of one content: one stored file, equal valid refs, no temp files."""
    data = content(40 * CHUNK + 3, round_)
    barrier = threading.Barrier(8)
    refs: list[BlobRef] = []
    errors: list[BaseException] = []

    def worker():
        try:
            barrier.wait(timeout=10)
            refs.append(store.put(io.BytesIO(data)))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert len(refs) == 8 and len(set(refs)) == 1
    blob_id = refs[0].blob_id
    assert refs[0].size == len(data)
    assert files_under(store.root) == [store.path_of(blob_id)]
    assert list(store.iter_blobs()) == [blob_id]
    assert list(store.iter_temp()) == []
    assert store.verify(blob_id) == len(data)


# --- blob ids ----------------------------------------------------------------------------------

BAD_IDS = ["../x", "ab/../../etc", "../" + "a" * 61, "/" + "a" * 63, "A" * 64, "a" * 63 + "F",
           "a" * 63, "a" * 65, "g" * 64, "", " " + "a" * 63, "a" * 64 + "\n", "a" * 64 + "\0",
           "ａ" * 64, None, 123, b"a" * 64, ["a" * 64]]


@pytest.mark.parametrize("method", ["open", "exists", "delete", "verify", "path_of", "read_header"])
@pytest.mark.parametrize("bad", BAD_IDS, ids=[repr(b)[:20] for b in BAD_IDS])
def test_invalid_blob_ids_are_refused_before_any_path(store, tmp_path, method, bad):
    """Anything but 64 lowercase hex digits raises InvalidBlobId and touches no file."""
    put_bytes(store, b"x")
    victim = tmp_path / "etc"
    victim.write_bytes(b"keep")
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(InvalidBlobId):
        getattr(store, method)(bad)
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert victim.read_bytes() == b"keep"


@pytest.mark.parametrize("method", ["open", "verify"])
def test_unknown_well_formed_id_is_not_found(store, method):
    """A valid id with no blob raises BlobNotFound (not InvalidBlobId, not IntegrityError)."""
    put_bytes(store, b"x")
    with pytest.raises(BlobNotFound):
        getattr(store, method)("0" * 64)


def test_unknown_well_formed_id_does_not_exist(store):
    """exists() and delete() answer False for a valid id with no blob."""
    assert store.exists("f" * 64) is False
    assert store.delete("f" * 64) is False


# --- nothing readable at rest ------------------------------------------------------------------

PATIENT = "Zebedee^Quixotic-Marmalade"


def dicom_bytes() -> bytes:
    """A small, valid DICOM Part 10 file naming PATIENT."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = PATIENT, "ZQM-0001", "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 64, 64, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(range(256)) * 16
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_raw_store_holds_no_dicom_marker_or_patient_name(store):
    """After storing a DICOM file, no byte or name under the store root shows 'DICM' or the patient."""
    import pydicom

    plain = dicom_bytes()
    needles = [b"DICM", PATIENT.encode(), PATIENT.encode("utf-16-le"), b"Zebedee", b"Marmalade"]
    assert plain[128:132] == b"DICM" and PATIENT.encode() in plain
    blob_id = put_bytes(store, plain)
    with store.open(blob_id) as reader:
        assert pydicom.dcmread(reader).PatientName == PATIENT
    found = files_under(store.root)
    assert found == [store.path_of(blob_id)]
    for path in store.root.rglob("*"):
        assert not any(n.decode("latin-1") in str(path.relative_to(store.root)) for n in needles[:2])
        if path.is_file():
            raw = path.read_bytes()
            assert not [n for n in needles if n in raw], path


# --- crashes and leftovers ---------------------------------------------------------------------

class FailingStream:
    """A source that dies after handing out `good` bytes (a dropped upload, a read error)."""

    def __init__(self, good: int):
        self._data, self._at = content(good), 0

    def read(self, size: int = -1) -> bytes:
        if self._at >= len(self._data):
            raise OSError("connection reset while uploading")
        part = self._data[self._at:self._at + (size if size >= 0 else len(self._data))]
        self._at += len(part)
        return part


@pytest.mark.parametrize("good", [0, CHUNK, 5 * CHUNK + 3])
def test_failing_source_leaves_no_blob_and_no_temp(store, good):
    """An exception from the source propagates from put(); no blob becomes visible, no temp stays."""
    with pytest.raises(OSError, match="connection reset"):
        store.put(FailingStream(good))
    assert list(store.iter_blobs()) == []
    assert list(store.iter_temp()) == []
    assert files_under(store.root) == []


def test_early_sync_failure_fails_the_put(store, monkeypatch):
    """An error from a background fdatasync during put() fails the put; nothing becomes visible.

    The kernel reports a writeback error to a file descriptor once, so the final fsync alone
    might pass after an early sync saw the error.
    """
    calls = []

    def failing_sync(fd):
        calls.append(fd)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(blobstore._Writeback, "SYNC_STEP", 2 * SEALED)
    monkeypatch.setattr(blobstore, "_FDATASYNC", failing_sync)
    with pytest.raises(OSError, match="Input/output error"):
        store.put(io.BytesIO(content(BIG)))
    assert calls, "no early sync was started"
    assert list(store.iter_blobs()) == []
    assert list(store.iter_temp()) == []


def test_early_syncs_run_during_a_large_put(store, monkeypatch):
    """put() of a many-chunk blob starts background syncs and still round-trips."""
    calls = []
    monkeypatch.setattr(blobstore._Writeback, "SYNC_STEP", 2 * SEALED)
    monkeypatch.setattr(blobstore, "_FDATASYNC", lambda fd: calls.append(os.fdatasync(fd)))
    data = content(BIG)
    blob_id = put_bytes(store, data)
    assert len(calls) >= 1
    with store.open(blob_id) as reader:
        assert reader.read() == data


def test_stored_files_are_private(store, keyring, monkeypatch):
    """Blob files and rotation journal files are created 0600 even under a permissive umask."""
    journal_modes = []
    real_replace = os.replace

    def spy_replace(src, dst):
        journal_modes.append(os.stat(src).st_mode & 0o777)
        return real_replace(src, dst)

    old_umask = os.umask(0o022)
    try:
        blob_id = put_bytes(store, content(BIG))
        rotation.journal_dir(store).mkdir(mode=0o700, parents=True, exist_ok=True)
        monkeypatch.setattr(rotation.os, "replace", spy_replace)
        new = os.urandom(32)
        rotation.rewrap_blob(store, blob_id, keyring.masters[keyring.current_id], key_id_of(new), new)
    finally:
        os.umask(old_umask)
    assert os.stat(store.path_of(blob_id)).st_mode & 0o777 == 0o600
    assert journal_modes == [0o600]


def test_hand_made_temp_leftovers_are_listed_not_yielded(store):
    """Files under tmp/ (and odd names in fan-out folders) show in iter_temp, never in iter_blobs."""
    blob_id = put_bytes(store, content(BIG))
    part = store.tmp_dir / ("0" * 32 + ".part")
    part.write_bytes(b"\0" * HEADER_BYTES + os.urandom(3 * SEALED))
    posing = store.tmp_dir / ("e" * 64)  # a temp file whose name looks like an id
    posing.write_bytes(b"x")
    (store.path_of(blob_id).parent / (blob_id + ".part")).write_bytes(b"x")
    assert list(store.iter_temp()) == sorted([part, posing])
    assert list(store.iter_blobs()) == [blob_id]


_KILLED_WRITER = """
import sys
from onprem_label.storage.blobstore import EncryptedBlobStore
from onprem_label.storage.format import key_id_of
from onprem_label.storage.keyring import Keyring
master, root = bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3])
keyring = Keyring({key_id_of(master): master}, key_id_of(master), root)
EncryptedBlobStore(sys.argv[1], keyring, chunk_size=int(sys.argv[4])).put(sys.stdin.buffer)
"""


def test_writer_killed_mid_put_leaves_only_a_temp_file(store, keyring):
    """SIGKILL during put() leaves a file under tmp/ only: no blob appears, the store stays usable."""
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(store.root),
                             keyring.masters[keyring.current_id].hex(), keyring.root_key.hex(),
                             str(CHUNK)], stdin=subprocess.PIPE)
    try:
        proc.stdin.write(content(20 * CHUNK))
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        while not list(store.iter_temp()):
            assert proc.poll() is None and time.monotonic() < deadline, "writer never started"
            time.sleep(0.02)
        time.sleep(0.2)  # let it write some chunks; it waits for more input, never for EOF
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
    assert proc.returncode == -signal.SIGKILL
    leftovers = list(store.iter_temp())
    assert len(leftovers) == 1 and leftovers[0].name.endswith(".part")
    assert files_under(store.root) == leftovers
    assert list(store.iter_blobs()) == []
    blob_id = put_bytes(store, content(20 * CHUNK))
    assert list(store.iter_blobs()) == [blob_id]
    assert list(store.iter_temp()) == leftovers
