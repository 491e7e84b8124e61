"""The one exception hierarchy of postdiff.

Every problem a user can cause or fix (a bad flag, a broken bundle, an unsupported model) raises a
subclass of :class:`PostdiffError`. Its message names the offending value, what was expected and
what to do. The command line turns these into one line on stderr and the class's ``exit_code``:
2 for bad input or usage, 1 for a check that failed (:class:`VerificationError`: a bundle whose
files do not match their manifest, a graph that does not reproduce torch). Anything else that
escapes is a bug in postdiff: it keeps its traceback, and Python exits with 1.
"""

from __future__ import annotations


EXIT_FAILURE, EXIT_USAGE = 1, 2


class PostdiffError(Exception):
    """Root of all user-facing postdiff errors."""

    #: the command line's exit status for this error
    exit_code: int = EXIT_USAGE


class InputError(PostdiffError, ValueError):
    """A flag, argument or tensor fed to postdiff is invalid (wrong value, shape, dtype)."""


class BundleError(PostdiffError):
    """A bundle is missing, incomplete, or of an unknown format version."""


class ModelSourceError(PostdiffError):
    """A model to export cannot be read or is not a supported architecture."""


class ScheduleError(PostdiffError, ValueError):
    """A denoising schedule is malformed or cannot run on the given bundle."""


class VerificationError(PostdiffError):
    """A check of files or results failed (exit code 1): not a bad input, but a result that is wrong."""

    exit_code = EXIT_FAILURE


class RunFailure(PostdiffError):
    """A computation that was set up correctly failed while running (exit code 1): a measuring child
    process died or exited with an error, a backend failed at run time."""

    exit_code = EXIT_FAILURE


class CorruptBundleError(BundleError):
    """A bundle's files do not verify: a file the manifest names is missing or has another sha256,
    or onnxruntime cannot load a graph whose hash matches."""


class ParityError(VerificationError):
    """An exported graph does not reproduce its torch reference within tolerance."""


class GenerationError(RunFailure):
    """A generation failed while running (not because of its input); images written before it are kept."""


class ClusterError(RunFailure):
    """Distributed work (`postdiff tune --ray`) cannot go on: workers keep dying, or there are none."""
