"""DICOM SR export: one TID 1500 Measurement Report (Comprehensive 3D SR) per task with boxes, points, lines.

Every bbox, polygon, polyline and point of a schema class is one planar ROI group (TID 1410) whose
finding type is the class's project-local code and whose region is a SCOORD on the de-identified
instance (and frame) it was drawn on: a box and a polygon as a closed POLYLINE, a polyline as an open
one, a point as a POINT. SCOORD image coordinates put 0,0 at the top-left corner of the top-left
pixel, as our shapes do, so the numbers are the stored ones. The observer is this software (a device):
no staff name is written.
"""

from __future__ import annotations

from typing import Callable

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from onprem_label.exchange import dicom_source
from onprem_label.exchange.dicom_source import class_code
from onprem_label.exchange.selection import ExportRow

KINDS = ("bbox", "polygon", "polyline", "point")
IMAGING = hd.sr.CodedConcept(value="363679005", scheme_designator="SCT", meaning="Imaging")


def graphic(shape: dict) -> tuple[str, list[list[float]]]:
    """(SCOORD graphic type, points as [column, row]) of one shape."""
    kind = shape["type"]
    if kind == "point":
        return "POINT", [[float(shape["x"]), float(shape["y"])]]
    if kind == "bbox":
        x, y, w, h = (float(shape[k]) for k in ("x", "y", "width", "height"))
        return "POLYLINE", [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
    points = [[float(px), float(py)] for px, py in shape["points"]]
    if kind == "polygon" and points[0] != points[-1]:
        points.append(points[0])  # a closed POLYLINE ends where it starts (PS3.3 C.18.6.1.2)
    return "POLYLINE", points


def measurement_report(row: ExportRow, header: Callable[[int], Dataset], classes: list[str]) -> Dataset | None:
    """The task's SR, or None when it has no box, point or line of a schema class; NotDerivable when it
    cannot be made."""
    shapes = [s for s in row.shapes if s["type"] in KINDS and s.get("label") in classes]
    if not shapes:
        return None
    sources: dict[int, Dataset] = {}
    groups = []
    with dicom_source.refusals():  # a degenerate shape, a source without the attributes highdicom needs
        for n, shape in enumerate(shapes, 1):
            index, local = dicom_source.locate(row, int(shape.get("frame", 0)))
            if index not in sources:
                sources[index] = header(index)
            source = sources[index]
            kind, data = graphic(shape)
            frames = [local + 1] if row.images[index].frames > 1 else None  # numbered from 1
            region = hd.sr.ImageRegion(graphic_type=kind, graphic_data=np.array(data), source_image=(
                hd.sr.SourceImageForRegion(referenced_sop_class_uid=source.SOPClassUID,
                                           referenced_sop_instance_uid=source.SOPInstanceUID,
                                           referenced_frame_numbers=frames)))
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=hd.UID(), identifier=dicom_source.text(f"task {row.task.id} shape {shape.get('id') or n}")),
                referenced_region=region, finding_type=class_code(shape["label"])))
        observer = hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=hd.UID(), name=dicom_source.MANUFACTURER))
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=IMAGING, imaging_measurements=groups)
        evidence = list(sources.values())
        sr = hd.sr.Comprehensive3DSR(evidence=evidence, content=report, **dicom_source.common(hd.UID()))
    return dicom_source.mark_deidentified(sr, evidence[0], [s["label"] for s in shapes])

