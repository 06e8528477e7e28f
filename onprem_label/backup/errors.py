"""The one exception family of backup, verify and restore: an operator-facing line."""


class BackupError(Exception):
    """A backup cannot be made, checked or restored; the message says why in one line."""
