"""Writing files safely, for the whole package (runtime included: it imports only the standard library
and the errors module).

* :func:`check_new_path` -- the one check of an output path (``--out`` and the like) before any work
  starts: its folder exists, and it does not exist unless replacing it is allowed.
* :func:`atomic_path` -- nothing half-written: write to a temporary file beside the target and rename
  it onto the target in one step, only when the writing finished.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from postdiff.errors import InputError


def check_new_path(path: Path, *, what: str = "--out", replace: bool = False,
                   hint: str = "pass --overwrite") -> Path:
    """``path`` checked before any work: its folder exists, and it does not unless ``replace``.

    Args:
        path: the file or folder to be written.
        what: how the message names it (the flag it came from).
        replace: whether an existing ``path`` may be replaced.
        hint: the fix offered besides choosing another path when ``path`` exists.

    Raises:
        InputError: ``path`` exists (and may not be replaced), or its folder does not exist.
    """
    path = Path(path)
    if path.exists() and not replace:
        raise InputError(f"{what} {path} already exists; choose another path or {hint}")
    if not path.parent.is_dir():
        raise InputError(f"{what} {path}: folder {path.parent} does not exist; create it first")
    return path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; when the block finishes it is renamed onto
    ``path`` (``os.replace``: readers see the old file or the new one, never a part); when the block
    raises (Ctrl-C included) it is deleted and ``path`` is left as it was.

    The temporary name ends with ``path``'s suffix, so writers that pick a format from the suffix
    (PIL, matplotlib) write the right one.

    Raises:
        InputError: the folder of ``path`` does not exist.
    """
    path = check_new_path(path, what="cannot write", replace=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
