"""put() as first written, before the throughput work (never committed): kept to compare against.

One thread does everything: read a chunk (new bytes), HMAC it, encrypt it (new bytes), write it
through a buffered file; one fsync at the end. Same file bytes as the store's put() (the bench
checks the ids match). Not used by the server.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from onprem_label.storage import format as fmt
from onprem_label.storage.blobstore import TEMP_SUFFIX, BlobRef, _fsync_dir, _read_full


def put_before(store, stream) -> BlobRef:
    """EncryptedBlobStore.put as it was: serial, allocating, buffered writes."""
    store.tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    master_id, master_key = store.keyring.current()
    data_key, salt = os.urandom(fmt.DATA_KEY_BYTES), os.urandom(fmt.SALT_BYTES)
    keys = fmt.BlobKeys(data_key, salt)
    aead = keys.payload
    namer = hmac.new(store.keyring.purpose_key("blob-names"), digestmod=hashlib.sha256)
    temp = store.tmp_dir / (os.urandom(16).hex() + TEMP_SUFFIX)
    size = 0
    try:
        with open(temp, "xb") as out:
            out.write(b"\0" * fmt.HEADER_BYTES)
            index, pending = 0, _read_full(stream, store.chunk_size)
            while True:
                following = _read_full(stream, store.chunk_size) if len(pending) == store.chunk_size else b""
                last = not following
                namer.update(pending)
                out.write(fmt.seal_chunk(aead, salt, index, last, pending))
                size += len(pending)
                if last:
                    break
                index, pending = index + 1, following
            blob_id = namer.digest()
            header = fmt.Header(store.chunk_size, master_id, salt,
                                fmt.wrap_key(master_key, data_key), blob_id, b"")
            header = fmt.Header(**{**header.__dict__, "mac": keys.header_mac(header.signed_part())})
            out.seek(0)
            out.write(header.to_bytes())
            out.flush()
            os.fsync(out.fileno())
        ref = BlobRef(blob_id.hex(), size)
        final = store.path_of(ref.blob_id)
        final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            os.link(temp, final)
        except FileExistsError:
            pass
        else:
            _fsync_dir(final.parent)
        return ref
    finally:
        temp.unlink(missing_ok=True)
