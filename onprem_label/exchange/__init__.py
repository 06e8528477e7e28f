"""Dataset exchange: exports of a project's accepted labels (COCO, YOLO, VOC, CSV, JSON Lines, DICOM SEG and SR)."""
