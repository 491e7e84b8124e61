"""Writing a bundle folder atomically: everything goes to a hidden staging folder beside the
destination, which is renamed into place only after the manifest is written."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from postdiff.files import check_new_path
from postdiff.runtime.manifest import MANIFEST_NAME, Manifest, dump_manifest


def check_destination(dest: Path) -> None:
    """Refuse an existing destination or a missing parent folder, before any work starts."""
    check_new_path(dest, hint="delete it first")


@contextmanager
def staging_folder(dest: Path) -> Iterator[Path]:
    """Yield a fresh staging folder; on success the caller calls :func:`publish`, on any error
    (including Ctrl-C) the staging folder is deleted and ``dest`` is left untouched."""
    check_destination(dest)
    stage = Path(dest).parent / f".{Path(dest).name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, dest: Path, manifest: Manifest) -> None:
    """Write the manifest last, then move the staging folder to ``dest`` in one rename."""
    (stage / MANIFEST_NAME).write_text(dump_manifest(manifest), encoding="utf-8")
    check_destination(dest)
    os.rename(stage, dest)
