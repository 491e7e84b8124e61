"""The one exception hierarchy of postdiff.

Every problem a user can cause or fix (a bad flag, a broken bundle, an unsupported model) raises a
subclass of :class:`PostdiffError`. Its message names the offending value, what was expected and
what to do. The command line turns these into one line on stderr and exit code 2; anything else
that escapes is a bug in postdiff and keeps its traceback.
"""

from __future__ import annotations


class PostdiffError(Exception):
    """Root of all user-facing postdiff errors."""


class InputError(PostdiffError, ValueError):
    """A flag, argument or tensor fed to postdiff is invalid (wrong value, shape, dtype)."""


class BundleError(PostdiffError):
    """A bundle is missing, incomplete, corrupted, or of an unknown format version."""


class ModelSourceError(PostdiffError):
    """A model to export cannot be read or is not a supported architecture."""


class ScheduleError(PostdiffError, ValueError):
    """A denoising schedule is malformed or cannot run on the given bundle."""


class ParityError(PostdiffError):
    """An exported graph does not reproduce its torch reference within tolerance."""


class ClusterError(PostdiffError):
    """Distributed work (`postdiff tune --ray`) cannot go on: workers keep dying, or there are none."""
