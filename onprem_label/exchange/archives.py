"""YOLO and Pascal VOC exports: a zip of one label file per frame, streamed as it is written.

YOLO: labels/<frame>.txt with one "class cx cy w h" line per shape (normalised to 0..1; polygons and
masks by their bounding box; points and polylines left out), and data.yaml naming the classes.
Pascal VOC: Annotations/<frame>.xml with one <object> and its <bndbox> per shape, VOC's 1-based
pixel corners (xmin = x + 1, xmax = x + width, rounded). Every exported frame gets its file, empty
when it has no shape (both formats read a missing file as "no objects", an empty one the same).
"""

from __future__ import annotations

import zipfile
from typing import Callable, Iterable, Iterator
from xml.sax.saxutils import escape

from onprem_label.exchange import geometry
from onprem_label.exchange.selection import ExportRow, frame_name


class _Sink:
    """A write-only file whose bytes are taken out as the zip grows (zipfile writes unseekable streams)."""

    def __init__(self):
        self.parts: list[bytes] = []
        self.position = 0

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out


def zip_stream(files: Iterator[tuple[str, str | bytes | Iterable[bytes]]]) -> Iterator[bytes]:
    """A zip of (name, content) pairs, streamed as it is written; content is text, bytes, or an iterable
    of byte chunks (a large file or another export's stream: written through, never held whole)."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in files:
            if isinstance(content, (str, bytes)):
                archive.writestr(name, content)
            else:
                # force_zip64: the size is unknown until the end (an image file may pass 2 GiB).
                with archive.open(name, "w", force_zip64=True) as entry:
                    for chunk in content:
                        entry.write(chunk)
                        if sink.parts:
                            yield sink.take()
            if sink.position and sink.parts:
                yield sink.take()
    yield sink.take()


def _by_frame(row: ExportRow) -> dict[int, list[dict]]:
    frames: dict[int, list[dict]] = {f: [] for f in range(row.item.frames)}
    for shape in row.shapes:
        frames.setdefault(int(shape.get("frame", 0)), []).append(shape)
    return frames


def yolo_files(rows: Callable[[], Iterator[ExportRow]], schema: dict, info: dict) -> Iterator[tuple[str, str]]:
    """The YOLO zip's files (name, text), in order: data.yaml, then labels/<frame>.txt per exported frame."""
    classes = [c["name"] for c in schema.get("classes", [])]
    names = {name: n for n, name in enumerate(classes)}
    yaml = "# onprem-label export: " + " ".join(f"{k}={v}" for k, v in info.items() if isinstance(v, (int, str))) + "\n"
    yaml += "path: .\ntrain: images\nval: images\n" + f"nc: {len(classes)}\nnames:\n"
    yaml += "".join(f"  {n}: {_yaml_text(name)}\n" for n, name in enumerate(classes))
    yield "data.yaml", yaml
    for row in rows():
        w, h = row.item.width, row.item.height
        for frame, shapes in _by_frame(row).items():
            lines = [f"{cls} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}"
                     for cls, (x, y, bw, bh) in ((names[s["label"]], b) for s, b in _labelled(shapes, names))]
            yield f"labels/{frame_name(row.item.id, frame, row.task.slot)}.txt", "".join(line + "\n" for line in lines)


def _yaml_text(name: str) -> str:
    """A class name as a YAML double-quoted scalar."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def voc_files(rows: Callable[[], Iterator[ExportRow]], schema: dict, info: dict) -> Iterator[tuple[str, str]]:
    """The Pascal VOC zip's files (name, text), in order: Annotations/<frame>.xml per exported frame."""
    names = {c["name"]: n for n, c in enumerate(schema.get("classes", []))}
    for row in rows():
        for frame, shapes in _by_frame(row).items():
            stem = frame_name(row.item.id, frame, row.task.slot)
            objects = "".join(
                f"<object><name>{escape(label)}</name><pose>Unspecified</pose><truncated>0</truncated>"
                f"<difficult>0</difficult><bndbox><xmin>{round(x) + 1}</xmin><ymin>{round(y) + 1}</ymin>"
                f"<xmax>{max(round(x) + 1, round(x + bw))}</xmax><ymax>{max(round(y) + 1, round(y + bh))}</ymax>"
                f"</bndbox></object>"
                for label, (x, y, bw, bh) in ((s["label"], b) for s, b in _labelled(shapes, names)))
            yield (f"Annotations/{stem}.xml",
                   f"<annotation><folder>images</folder><filename>{stem}.png</filename>"
                   f"<source><database>onprem-label</database></source><size><width>{row.item.width}</width>"
                   f"<height>{row.item.height}</height><depth>1</depth></size><segmented>0</segmented>"
                   f"{objects}</annotation>\n")


def _labelled(shapes: list[dict], names: dict[str, int]):
    """(shape, bounding box) of each shape of a known class that has a box (not points or lines)."""
    for shape in shapes:
        box = geometry.bounds(shape) if shape["type"] in ("bbox", "polygon", "mask") else None
        if box is not None and shape.get("label") in names:
            yield shape, box
