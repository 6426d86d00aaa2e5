"""The errors `onebox backup` and `onebox restore` report as one line each."""

from __future__ import annotations


class BackupError(Exception):
    """A backup or restore that cannot go on; the message says what and what to do."""


class IncompatibleBackup(BackupError):
    """A backup this version of onebox cannot restore (made by a newer one)."""
