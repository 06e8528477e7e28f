"""Backup, verify and restore of a whole site: database snapshot, encrypted blobs, manifest (no Flask)."""

from onprem_label.backup.errors import BackupError

__all__ = ["BackupError"]
