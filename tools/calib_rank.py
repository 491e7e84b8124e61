"""Is a small calibration set enough to rank the tuner's candidates?

`postdiff tune` ranks candidates by a fidelity metric measured on ``--calib`` samples. This tool
measures every candidate of the tuning space that a bundle has graphs for at two calibration
sizes and reports the Spearman rank correlation between the two rankings (1: the small set ranks
the candidates exactly as the large one does). The metric is the tuner's: digit-FID for the digit
model, PSNR against the 20-step baseline otherwise (the baseline itself, identical to its
reference, is then left out of the ranking).

Results go through the tuner's cache, so a later ``postdiff tune --calib N --cache SAME`` reuses
them (and vice versa)::

    python -m postdiff.tools.calib_rank BUNDLE --small 32 --large 256 --workers 2 \\
        --cache tune-cache.jsonl --json calib_rank.json
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from postdiff.profiles.tuning import FEWER, build, candidates
from postdiff.errors import BundleError, InputError, PostdiffError
from postdiff.runtime.schedulers import SCHEDULERS
from postdiff.runtime.jsonio import write_json_atomic
from postdiff.runtime.manifest import load_manifest
from postdiff.tools.tune import TuneCache, decisive_metric, evaluate_fidelity, has_graphs


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n of ``values`` (ascending), ties sharing the mean of the ranks they span."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0  # mean of ranks i+1 .. j+1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho: the Pearson correlation of the (tie-averaged) ranks of ``a`` and ``b``.

    Raises:
        InputError: fewer than 3 pairs, lengths that differ, or a constant sequence (rho undefined).
    """
    if len(a) != len(b) or len(a) < 3:
        raise InputError(f"spearman needs two equally long sequences of at least 3 values; got {len(a)} and "
                         f"{len(b)}; evaluate more candidates")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float(np.sum(ra * ra) * np.sum(rb * rb)))
    if denominator == 0.0:
        raise InputError("spearman is undefined for a constant sequence (every candidate scored the same)")
    return float(np.sum(ra * rb) / denominator)


def calib_rank(bundle: Path, small: int, large: int, workers: int = 1, scheduler: str = "ddim",
               cache: Path | None = None, progress: bool = True) -> dict:
    """Measure every available candidate at ``small`` and ``large`` calibration sizes and compare the
    rankings. Returns {"metric", "small", "large", "spearman", "top1_agrees", "candidates": [...]}.

    Raises:
        InputError: ``small`` >= ``large`` or below 2.
        BundleError: the bundle lacks the baseline graph.
    """
    if not 2 <= small < large:
        raise InputError(f"--small {small} and --large {large}: expected 2 <= small < large, e.g. --small 32 "
                         "--large 256")
    manifest = load_manifest(Path(bundle), verify=True)  # every file's sha256, once
    pool = candidates()
    schedules = [build(c) for c in pool]
    reference = next(s for c, s in zip(pool, schedules) if c.family == FEWER and c.steps == 20)
    if not has_graphs(manifest, reference):
        raise BundleError(f"bundle {bundle} lacks the 20-step baseline's graph; re-export it with --tuning-space")
    available = [s for s in schedules if has_graphs(manifest, s)]
    store = TuneCache(cache)
    results = {size: evaluate_fidelity(Path(bundle), available, reference, size, scheduler, workers, store,
                                       progress)[0] for size in (small, large)}
    metric = decisive_metric(manifest)
    names = [s.name for s in available if results[small][s.name][metric] is not None
             and results[large][s.name][metric] is not None]
    sign = 1.0 if metric == "digit_fid" else -1.0  # rank 1 = the most faithful
    small_values = [sign * results[small][n][metric] for n in names]
    large_values = [sign * results[large][n][metric] for n in names]
    rho = spearman(small_values, large_values)
    small_ranks, large_ranks = average_ranks(small_values), average_ranks(large_values)
    rows = [{"name": n, f"{metric}@{small}": results[small][n][metric], f"rank@{small}": float(rs),
             f"{metric}@{large}": results[large][n][metric], f"rank@{large}": float(rl)}
            for n, rs, rl in zip(names, small_ranks, large_ranks)]
    rows.sort(key=lambda r: r[f"rank@{large}"])
    return {"bundle": str(bundle), "metric": metric, "small": small, "large": large, "scheduler": scheduler,
            "spearman": rho, "top1_agrees": names[int(np.argmin(small_ranks))] == names[int(np.argmin(large_ranks))],
            "candidates": rows}


def format_report(report: dict) -> str:
    """The comparison as a table."""
    m, s, l = report["metric"], report["small"], report["large"]
    lines = [f"{'candidate':<36} {f'{m}@{s}':>14} {f'rank@{s}':>8} {f'{m}@{l}':>14} {f'rank@{l}':>8}"]
    for r in report["candidates"]:
        lines.append(f"{r['name']:<36} {r[f'{m}@{s}']:>14.3f} {r[f'rank@{s}']:>8.1f} {r[f'{m}@{l}']:>14.3f} "
                     f"{r[f'rank@{l}']:>8.1f}")
    lines.append(f"Spearman rank correlation, calib {s} vs {l}, over {len(report['candidates'])} candidates: "
                 f"{report['spearman']:.3f}; same best candidate: {'yes' if report['top1_agrees'] else 'no'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m postdiff.tools.calib_rank", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="bundle exported with --tuning-space")
    parser.add_argument("--small", type=int, default=32, help="small calibration size (default 32)")
    parser.add_argument("--large", type=int, default=256, help="large calibration size (default 256)")
    parser.add_argument("--workers", type=int, default=1, help="processes measuring fidelity (default 1)")
    parser.add_argument("--scheduler", default="ddim", choices=list(SCHEDULERS))
    parser.add_argument("--cache", help="tune cache (JSON lines) to read and extend")
    parser.add_argument("--json", help="also write the report as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        report = calib_rank(Path(args.bundle), args.small, args.large, args.workers, args.scheduler,
                            Path(args.cache) if args.cache else None, progress=not args.quiet)
    except PostdiffError as exc:
        print(f"calib_rank: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        write_json_atomic(Path(args.json), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
