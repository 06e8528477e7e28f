"""Rendered frames and thumbnails of items, cached as blobs in the encrypted store."""

from __future__ import annotations

import io
from datetime import datetime
from typing import Iterator

import pydicom
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from onprem_label.db.models import Blob, Item, ItemImage, Rendition
from onprem_label.imaging import render
from onprem_label.imaging.render import RenderError, Window
from onprem_label.storage import BlobNotFound, EncryptedBlobStore, IntegrityError as BlobIntegrityError

THUMB_SIDE = 256


def image_index(images, frame: int) -> tuple[int, int]:
    """(index in `images`, frame inside that image) of an item's frame `frame` (0-based), the item's
    frames being its images' frames in order; ValueError past the end."""
    if frame >= 0:
        for index, image in enumerate(images):
            if frame < image.frames:
                return index, frame
            frame -= image.frames
    raise ValueError("frame out of range")


def locate_frame(item: Item, frame: int) -> tuple[ItemImage, int]:
    """The image holding the item's frame `frame` (0-based) and the frame's index inside it."""
    if frame < 0 or frame >= item.frames:
        raise ValueError(f"frame must be from 0 to {item.frames - 1}")
    index, local = image_index(item.images, frame)  # ValueError if frames and images disagree: never expected
    return item.images[index], local


def spec_of(window: Window | None) -> str:
    """The cache key part for a window: 'default' or 'c<center>w<width>'."""
    return "default" if window is None else f"c{window.center:g}w{window.width:g}"


def frame_png(db: Session, store: EncryptedBlobStore, item: Item, frame: int, window: Window | None,
              *, now: datetime) -> bytes:
    """PNG of one frame at a window (or the image's own), from the cache or rendered and cached."""
    image, local = locate_frame(item, frame)
    return _cached(db, store, image, local, spec_of(window), now,
                   lambda: _render(store, item, image, local, window))


def thumbnail_png(db: Session, store: EncryptedBlobStore, item: Item, *, now: datetime) -> bytes:
    """A small PNG of the item's middle frame (the middle slice of a stack), cached."""
    image, local = locate_frame(item, item.frames // 2)
    return _cached(db, store, image, local, f"thumb{THUMB_SIDE}", now,
                   lambda: render.thumbnail_png(_display(store, item, image, local, None), THUMB_SIDE))


def image_pngs(store: EncryptedBlobStore, item, image) -> Iterator[bytes]:
    """PNG of every frame of one stored image at its own window, rendered now and not cached (an export
    reads through a snapshot that cannot write the cache; the file is opened once, not once per frame);
    `item` needs `kind`, `image` `blob_id`, `frames` and `meta`."""
    if item.kind == "raster":
        yield _render(store, item, image, 0, None)
        return
    with store.open(image.blob_id) as reader:
        ds = pydicom.dcmread(reader)
    for frame in range(image.frames):
        yield render.encode_png(_frame_display(ds, frame, None))


def _cached(db: Session, store: EncryptedBlobStore, image: ItemImage, frame: int, spec: str,
            now: datetime, make) -> bytes:
    row = db.get(Rendition, (image.blob_id, frame, spec))
    if row is not None:
        try:
            with store.open(row.blob_id) as reader:
                return reader.read()
        except (BlobNotFound, BlobIntegrityError):
            pass  # a damaged cache entry is rendered again; doctor reports the blob itself
    png = make()
    ref = store.put(io.BytesIO(png))
    try:
        with db.begin_nested():
            if db.get(Blob, ref.blob_id) is None:
                db.add(Blob(id=ref.blob_id, size=ref.size, created_at=now))
            if row is None:
                db.add(Rendition(source_blob_id=image.blob_id, frame=frame, spec=spec, blob_id=ref.blob_id,
                                 created_at=now))
            else:
                row.blob_id = ref.blob_id
    except IntegrityError:
        pass  # another request cached the same rendition first; this PNG is the same picture
    return png


def _render(store: EncryptedBlobStore, item: Item, image: ItemImage, frame: int, window: Window | None) -> bytes:
    if item.kind == "raster" and window is None and image.meta.get("mode") in ("L", "RGB", "RGBA"):
        with store.open(image.blob_id) as reader:
            return reader.read()  # the stored page is already a clean 8-bit PNG
    return render.encode_png(_display(store, item, image, frame, window))


def _display(store: EncryptedBlobStore, item: Item, image: ItemImage, frame: int, window: Window | None):
    with store.open(image.blob_id) as reader:
        if item.kind == "raster":
            return render.display_raster(reader.read())
        ds = pydicom.dcmread(reader)  # seekable; pydicom reads only what it needs
        return _frame_display(ds, frame, window)


def _frame_display(ds, frame: int, window: Window | None):
    try:
        return render.display_array(ds, render.decode_frame(ds, frame), window)
    except RenderError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - decoders raise anything, Rust panics included
        raise RenderError(f"frame {frame + 1} cannot be rendered ({type(exc).__name__})") from None
