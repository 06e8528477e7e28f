"""Image ingest: DICOM and raster reading, de-identification, rendering, thumbnails."""
