"""Images beside an export's labels (`images=png|dicom`): rendered frames or the de-identified DICOM files.

png: images/<frame>.png per exported frame, the stem every label format uses (COCO file_name, YOLO
and VOC label files), at the image's own window; a picture's stored page as it is. dicom: the
de-identified instance as stored, images/<SOP Instance UID>.dcm, once per item (consensus copies share
it); pictures have no DICOM and are counted, not written. images/index.json ends the folder: what was
written, and what was left out because the stored file could not be read.
"""

from __future__ import annotations

import json
from typing import Callable, Iterator

from onprem_label.exchange.selection import ExportRow, frame_name
from onprem_label.imaging.renditions import image_pngs
from onprem_label.imaging.render import RenderError
from onprem_label.storage import BlobNotFound, EncryptedBlobStore, IntegrityError

KINDS = ("png", "dicom")
CHUNK = 1 << 20


def image_files(rows: Callable[[], Iterator[ExportRow]], store: EncryptedBlobStore, kind: str) -> Iterator[tuple]:
    """(name, content) of every image file of the exported tasks, then images/index.json."""
    counts = {"written": 0, "not_dicom": 0, "unreadable": 0}
    seen: set[int] = set()  # item ids whose DICOM is written (an int per item, not a file)
    for row in rows():
        if kind == "dicom":
            if row.item.kind != "dicom":
                counts["not_dicom"] += 1
                continue
            if row.item.id in seen:
                continue
            seen.add(row.item.id)
            for image in row.images:
                try:
                    reader = store.open(image.blob_id)
                except (BlobNotFound, IntegrityError):
                    counts["unreadable"] += image.frames  # missing before a byte of it is written: left out
                    continue
                counts["written"] += 1
                yield f"images/{image.instance_uid}.dcm", _chunks(reader)
            continue
        start = 0
        for image in row.images:
            done = 0
            try:
                for png in image_pngs(store, row.item, image):
                    yield f"images/{frame_name(row.item.id, start + done, row.task.slot)}.png", png
                    done += 1
            except (RenderError, BlobNotFound, IntegrityError):
                # A damaged stored image (doctor --storage reports it): the rest of the export still leaves.
                counts["unreadable"] += image.frames - done
            counts["written"] += done
            start += image.frames
    yield "images/index.json", json.dumps({"images": kind, **counts}) + "\n"


def _chunks(reader) -> Iterator[bytes]:
    """An open stored file's plaintext a chunk at a time (damage found midway raises: the zip is cut off)."""
    with reader:
        while chunk := reader.read(CHUNK):
            yield chunk
