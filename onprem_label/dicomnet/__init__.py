"""The DICOM receiver: C-STORE and C-ECHO SCP that feeds received instances into the ingest path."""
