"""Exception types for errors a user can cause.

Each kind of mistake (a bad option, a bad file, a missing download) has one type, and every message says
what went wrong and how to fix it. The command-line front-ends print these messages without a traceback
and exit non-zero; anything else is a bug and keeps its traceback.
"""


class PidError(Exception):
    """Base class of every error a user can cause and fix."""


class ConfigError(PidError, ValueError):
    """An option or argument has a value we cannot use (unknown name, wrong range, inconsistent settings)."""


class CheckpointError(PidError):
    """A checkpoint, pickle or statistics file is missing, corrupt, or of the wrong kind."""


class DownloadError(PidError):
    """A file that must be downloaded cannot be had (offline, bad URL); says where to put it by hand."""


class DataError(PidError):
    """Images, labels or statistics given as input do not fit (too few images, wrong shape, empty folder)."""
