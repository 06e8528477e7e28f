"""Blob file format v1: authenticated header, AES-256-GCM chunks (see docs/storage-format.md)."""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

MAGIC = b"\x89OPLBLB\n"
VERSION = 1
WRAP_AES_KW = 1  # RFC 3394 AES key wrap
KEY_ID_BYTES = 8
SALT_BYTES = 32
DATA_KEY_BYTES = 32
WRAPPED_KEY_BYTES = DATA_KEY_BYTES + 8
BLOB_ID_BYTES = 32
MAC_BYTES = 32
TAG_BYTES = 16
DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 1 << 10
MAX_CHUNK_SIZE = 1 << 26

# magic, version, wrap algorithm, chunk size, key id, salt, wrapped-key length
_FIXED = struct.Struct(f">8sBBI{KEY_ID_BYTES}s{SALT_BYTES}sB")
HEADER_BYTES = _FIXED.size + WRAPPED_KEY_BYTES + BLOB_ID_BYTES + MAC_BYTES


class IntegrityError(Exception):
    """A blob failed authentication: tampered, truncated, extended, swapped or not ours."""


@dataclass(frozen=True)
class Header:
    """The parsed, not yet authenticated, header of a blob file."""

    chunk_size: int
    key_id: bytes
    salt: bytes
    wrapped_key: bytes
    blob_id: bytes
    mac: bytes

    def signed_part(self) -> bytes:
        """Every header byte the MAC covers (all but the MAC)."""
        return (_FIXED.pack(MAGIC, VERSION, WRAP_AES_KW, self.chunk_size, self.key_id, self.salt,
                            len(self.wrapped_key)) + self.wrapped_key + self.blob_id)

    def to_bytes(self) -> bytes:
        """The header as stored."""
        return self.signed_part() + self.mac


def parse_header(raw: bytes) -> Header:
    """Parse header bytes; IntegrityError when they cannot be a v1 header."""
    if len(raw) < HEADER_BYTES:
        raise IntegrityError("blob file shorter than its header")
    magic, version, wrap, chunk_size, key_id, salt, wrapped_len = _FIXED.unpack_from(raw)
    if magic != MAGIC:
        raise IntegrityError("not an onprem-label blob (bad magic)")
    if version != VERSION or wrap != WRAP_AES_KW or wrapped_len != WRAPPED_KEY_BYTES:
        raise IntegrityError(f"unsupported blob format (version {version}, wrap {wrap})")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise IntegrityError("blob header has an impossible chunk size")
    at = _FIXED.size
    wrapped = raw[at:at + WRAPPED_KEY_BYTES]
    at += WRAPPED_KEY_BYTES
    blob_id = raw[at:at + BLOB_ID_BYTES]
    mac = raw[at + BLOB_ID_BYTES:at + BLOB_ID_BYTES + MAC_BYTES]
    return Header(chunk_size, key_id, salt, wrapped, blob_id, mac)


def _hkdf(key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)


@dataclass(frozen=True)
class BlobKeys:
    """The keys one blob's content is sealed with, all from its random data key."""

    data_key: bytes
    salt: bytes

    @property
    def payload(self) -> AESGCM:
        """AES-256-GCM under the payload key."""
        return AESGCM(_hkdf(self.data_key, self.salt, b"onprem-label blob payload v1"))

    def header_mac(self, signed: bytes) -> bytes:
        """HMAC-SHA-256 of the header under the header key."""
        key = _hkdf(self.data_key, self.salt, b"onprem-label blob header v1")
        return hmac.new(key, signed, hashlib.sha256).digest()


def wrap_key(master_key: bytes, data_key: bytes) -> bytes:
    """Wrap a data key with a master key (AES key wrap, RFC 3394)."""
    return aes_key_wrap(master_key, data_key)


def unwrap_key(master_key: bytes, wrapped: bytes) -> bytes:
    """Unwrap a data key; IntegrityError when the wrapping was altered or the key is wrong."""
    try:
        return aes_key_unwrap(master_key, wrapped)
    except (InvalidUnwrap, ValueError):
        raise IntegrityError("data key does not unwrap: wrong master key or altered header") from None


def open_header(header: Header, master_key: bytes) -> BlobKeys:
    """Unwrap the data key and check the header MAC; the keys, or IntegrityError."""
    keys = BlobKeys(unwrap_key(master_key, header.wrapped_key), header.salt)
    if not hmac.compare_digest(keys.header_mac(header.signed_part()), header.mac):
        raise IntegrityError("blob header fails authentication")
    return keys


def chunk_nonce(index: int, last: bool) -> bytes:
    """96-bit nonce: 88-bit big-endian chunk counter, then a last-chunk flag byte (as in Tink, age)."""
    if index >= 1 << 88:
        raise OverflowError("too many chunks")
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def chunk_aad(header: Header | None, salt: bytes) -> bytes:
    """Associated data of every chunk: format, version and the blob's salt.

    The blob id is a keyed hash of the content, known only after the last chunk, so chunks bind
    the per-blob salt; the header MAC then binds salt, blob id and key id together.
    """
    return MAGIC + bytes([VERSION]) + salt


def seal_chunk(aead: AESGCM, salt: bytes, index: int, last: bool, plaintext) -> bytes:
    """Encrypt one chunk."""
    return aead.encrypt(chunk_nonce(index, last), plaintext, chunk_aad(None, salt))


def seal_chunk_into(aead: AESGCM, salt: bytes, index: int, last: bool, plaintext, out) -> None:
    """Encrypt one chunk into `out`, a writable buffer of exactly len(plaintext) + TAG_BYTES."""
    aead.encrypt_into(chunk_nonce(index, last), plaintext, chunk_aad(None, salt), out)


def open_chunk(aead: AESGCM, salt: bytes, index: int, last: bool, sealed: bytes) -> bytes:
    """Decrypt one chunk; IntegrityError on any change, reorder, truncation or extension."""
    try:
        return aead.decrypt(chunk_nonce(index, last), sealed, chunk_aad(None, salt))
    except InvalidTag:
        raise IntegrityError(f"chunk {index} fails authentication") from None


def layout(file_size: int, chunk_size: int) -> tuple[int, int]:
    """(number of chunks, plaintext size) for a blob file of `file_size` bytes."""
    body = file_size - HEADER_BYTES
    full = chunk_size + TAG_BYTES
    if body < TAG_BYTES:
        raise IntegrityError("blob file is truncated")
    count = -(-body // full)
    last_len = body - (count - 1) * full - TAG_BYTES
    if last_len < 0 or (last_len == 0 and count > 1):
        raise IntegrityError("blob file is truncated or extended")
    return count, (count - 1) * chunk_size + last_len


def key_id_of(master_key: bytes) -> bytes:
    """The public id of a master key (no secret can be learned from it)."""
    return hmac.new(master_key, b"onprem-label key id v1", hashlib.sha256).digest()[:KEY_ID_BYTES]
