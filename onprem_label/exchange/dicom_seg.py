"""DICOM SEG export: one binary Segmentation per task with masks, made by highdicom on the de-identified source.

Each label class with a mask in the task is one segment (numbered from 1 in schema order, labelled
with the class name, typed with its project-local code); masks of one class on one frame are joined.
The SEG references the instances holding the masked frames (a stack: only the slices with masks; a
multi-frame instance: the instance, every frame). Tasks whose masks highdicom cannot place on their
source (for instance several frames without a frame of reference) are counted as unsupported.
"""

from __future__ import annotations

from typing import Callable

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from onprem_label import __version__
from onprem_label.exchange import dicom_source
from onprem_label.exchange.dicom_source import NotDerivable, class_code
from onprem_label.exchange.geometry import rle_pixels
from onprem_label.exchange.selection import ExportRow

CATEGORY = hd.sr.CodedConcept(value="class", scheme_designator=dicom_source.PRIVATE_SCHEME, meaning="Label class")


def segmentation(row: ExportRow, header: Callable[[int], Dataset], classes: list[str]) -> Dataset | None:
    """The task's SEG, or None when it has no mask of a schema class; NotDerivable when it cannot be made."""
    masks = [s for s in row.shapes if s["type"] == "mask" and s.get("label") in classes]
    if not masks:
        return None
    segments = [name for name in classes if any(s["label"] == name for s in masks)]
    # (image index, frame inside it) of every masked frame; the SEG's frames follow its sources.
    places = {dicom_source.locate(row, int(s.get("frame", 0))) for s in masks}
    indexes = sorted({index for index, _ in places})
    multi = any(row.images[i].frames > 1 for i in indexes)
    if multi and len(indexes) > 1:
        raise NotDerivable("masks on several multi-frame instances of one item")
    planes = list(range(row.images[indexes[0]].frames)) if multi else indexes
    pixels = np.zeros((len(planes), row.item.height, row.item.width, len(segments)), dtype=bool)
    for shape in masks:
        index, local = dicom_source.locate(row, int(shape.get("frame", 0)))
        mask = rle_pixels(shape["rle"])
        if mask.shape != pixels.shape[1:3]:
            raise NotDerivable(f"a mask of {mask.shape[1]}x{mask.shape[0]} on a "
                               f"{row.item.width}x{row.item.height} image")
        pixels[planes.index(local if multi else index), :, :, segments.index(shape["label"])] |= mask
    if not pixels.any():
        return None  # only empty masks: nothing to segment
    sources = [header(i) for i in indexes]
    with dicom_source.refusals():  # geometry highdicom cannot derive from, a missing attribute
        descriptions = [hd.seg.SegmentDescription(
            segment_number=n, segment_label=dicom_source.text(name), segmented_property_category=CATEGORY,
            segmented_property_type=class_code(name), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
            for n, name in enumerate(segments, 1)]
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, manufacturer_model_name="onprem-label",
            software_versions=__version__, device_serial_number="0",
            **dicom_source.common(hd.UID()))
    return dicom_source.mark_deidentified(seg, sources[0], segments)

