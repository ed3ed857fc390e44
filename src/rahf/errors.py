"""User-facing errors: one line saying what is wrong, where, and how to fix it (exit status 2)."""

from __future__ import annotations


class RahfError(Exception):
    """An input problem the user can fix. The CLI prints it as one line and exits with status 2."""


class ConfigError(RahfError):
    """A config key has a bad value, is unknown, or contradicts another."""


class DataError(RahfError, ValueError):
    """A data file is missing, unreadable, or holds a malformed record."""


class LoadError(RahfError):
    """A model or tokenizer whose files cannot be loaded (missing, cut short, unreadable)."""


class UpstreamError(RahfError):
    """An artifact a stage reads is missing or was made from other settings: run `stage` first."""

    def __init__(self, message: str, stage: str) -> None:
        super().__init__(message)
        self.stage = stage
