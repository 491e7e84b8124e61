"""How long this process has been running: the cold-start figure ``load_s`` is measured from it."""

from __future__ import annotations

import os
import time
from pathlib import Path

_IMPORTED = time.monotonic()  # fallback origin where the OS does not say when the process started


def process_age_s() -> float:
    """Seconds since this process started (Linux: from ``/proc``, 10 ms resolution; elsewhere: since
    this module was imported, which misses the interpreter's own start)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, ticks after boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return time.monotonic() - _IMPORTED
    return max(0.0, uptime - started)
