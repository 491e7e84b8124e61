"""Verify once: a stamp beside the bundle's files so that loading need not re-hash gigabytes.

``postdiff verify BUNDLE`` (or the first load) hashes every file the manifest names and writes
``verified.json`` into the bundle: per file its size, modification time (ns) and the sha256 it
had. A later load compares each file's size and mtime with the stamp and re-hashes only the files
that differ (or that the stamp does not vouch for at the manifest's hash). A changed or corrupted
file is still refused, naming it, before any compute. The stamp guards against corruption and
stale copies, not against someone who forges mtimes on purpose.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from postdiff.errors import BundleError, CorruptBundleError, PostdiffError
from postdiff.runtime.jsonio import load_versioned, write_json_atomic
from postdiff.runtime.manifest import MANIFEST_NAME, Manifest, bundle_files, sha256_file

STAMP_NAME = "verified.json"
STAMP_VERSION = 1


@dataclass(frozen=True)
class FileStamp:
    """What a file looked like when it was last hashed."""

    size: int
    mtime_ns: int
    sha256: str


@dataclass(frozen=True)
class Stamp:
    """``verified.json``: the manifest's own hash and one :class:`FileStamp` per bundle file."""

    format_version: int
    manifest_sha256: str
    files: dict[str, FileStamp]


@dataclass(frozen=True)
class Verification:
    """What a verification did: the files it hashed, and whether it (re)wrote the stamp."""

    hashed: tuple[str, ...]
    checked: int  # files vouched for, hashed or not
    stamp_written: bool


def read_stamp(bundle: Path) -> Stamp | None:
    """The bundle's stamp, or None when there is none or it cannot be used (then everything is
    re-hashed; a damaged stamp is never an error)."""
    path = Path(bundle) / STAMP_NAME
    if not path.is_file():
        return None
    try:
        return load_versioned(Stamp, path, STAMP_VERSION, BundleError, "it is rewritten")
    except PostdiffError:
        return None


def verify_bundle(bundle: Path, manifest: Manifest, use_stamp: bool = True, write: bool = True,
                  on_hash: Callable[[str], None] | None = None) -> Verification:
    """Check every file the manifest names against its recorded sha256.

    Args:
        use_stamp: trust files whose size and mtime match the stamp (False: hash everything).
        write: record the result in the stamp when anything was hashed (skipped silently on a
            read-only bundle).
        on_hash: called with each file name before it is hashed (progress).

    Raises:
        BundleError: a file is missing or its sha256 differs from the manifest, naming the file.
    """
    bundle = Path(bundle)
    manifest_sha = sha256_file(bundle / MANIFEST_NAME)
    stamp = read_stamp(bundle) if use_stamp else None
    if stamp is not None and stamp.manifest_sha256 != manifest_sha:
        stamp = None  # a new manifest: nothing the old stamp says applies
    known = stamp.files if stamp is not None else {}
    entries: dict[str, FileStamp] = {}
    hashed: list[str] = []
    for name, expected in sorted(bundle_files(manifest).items()):
        path = bundle / name
        try:
            info = path.stat()
        except OSError:
            raise CorruptBundleError(f"{path} is missing from the bundle; re-export the bundle") from None
        entry = FileStamp(size=info.st_size, mtime_ns=info.st_mtime_ns, sha256=expected)
        if known.get(name) != entry:
            if on_hash is not None:
                on_hash(name)
            actual = sha256_file(path)
            hashed.append(name)
            if actual != expected:
                raise CorruptBundleError(
                    f"{path} is corrupted: sha256 {actual[:12]}… but the manifest records "
                    f"{expected[:12]}…; re-export the bundle or restore the file"
                )
        entries[name] = entry
    written = False
    if write and (hashed or stamp is None):
        written = _write(bundle, Stamp(format_version=STAMP_VERSION, manifest_sha256=manifest_sha, files=entries))
    return Verification(hashed=tuple(hashed), checked=len(entries), stamp_written=written)


def _write(bundle: Path, stamp: Stamp) -> bool:
    """Write the stamp atomically; False where the bundle is read-only."""
    if not os.access(bundle, os.W_OK):
        return False
    try:
        write_json_atomic(bundle / STAMP_NAME, stamp)
    except OSError:
        return False
    return True
