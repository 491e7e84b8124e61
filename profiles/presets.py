"""The knobs behind every schedule preset in ``profiles/schedules/``.

The JSON files are what users read and what ``generate --schedule NAME`` loads; they are generated
from these knobs by ``python -m postdiff.profiles.presets`` and a test checks that they still match.
"""

from __future__ import annotations

from pathlib import Path

from postdiff.errors import ScheduleError
from postdiff.files import write_text_atomic
from postdiff.profiles.schedule_builder import ScheduleKnobs, build_schedule
from postdiff.runtime.jsonio import dumps
from postdiff.runtime.schedule import Schedule, load_schedule

SCHEDULES_DIR = Path(__file__).resolve().parent / "schedules"

# name -> (knobs, description)
PRESETS: dict[str, tuple[ScheduleKnobs, str]] = {
    "baseline": (ScheduleKnobs(steps=20),
                 "20 full-resolution steps with guidance: the reference every speed-up is measured against"),
    "fewer-steps": (ScheduleKnobs(steps=8),
                    "8 full-resolution steps: the paper's 'fewer steps' alternative at about the same compute"),
    "postdiff-sd15": (
        ScheduleKnobs(steps=20, low_res=((0.5, 10),), deepcache_interval=2, deepcache_branch=1, xattn_gate=5,
                      xattn_mode="cond"),
        "PostDiff on SD 1.5 (ICCV 2025): first 10 of 20 steps at 1/2 side length, DeepCache interval 2 "
        "(branch 1), cross-attention gate_step 5 (T-GATE's count: 5 guided steps) caching the conditional maps",
    ),
    "postdiff-beta34": (
        ScheduleKnobs(steps=20, low_res=((0.75, 10),), deepcache_interval=2, deepcache_branch=1, xattn_gate=5,
                      xattn_mode="cond"),
        "PostDiff with beta = 3/4 (the paper's setting for SDXL and PixArt-alpha): first 10 of 20 steps at 3/4 "
        "side length, DeepCache interval 2 (branch 1), cross-attention gate_step 5 (5 guided steps, Cond)",
    ),
    "lcm-4": (ScheduleKnobs(steps=4, cfg=False),
              "4 full-resolution LCM steps (guidance as an embedding, no CFG): the usual LCM setting"),
    "postdiff-lcm": (
        ScheduleKnobs(steps=6, low_res=((0.5, 2),), deepcache_interval=2, deepcache_branch=1, xattn_gate=3,
                      cfg=False),
        "PostDiff on an LCM (guidance as an embedding, no CFG): 6 steps, the first 2 at 1/2 side length, "
        "DeepCache interval 2 (branch 1), cross-attention gate_step 3 (maps written at step 2, read after it)",
    ),
    "postdiff-sdxl": (
        ScheduleKnobs(steps=20, low_res=((0.75, 10),), deepcache_interval=2, deepcache_branch=0, xattn_gate=5,
                      xattn_mode="cond"),
        "PostDiff on SDXL (ICCV 2025: beta = 3/4): first 10 of 20 steps at 3/4 side length, DeepCache interval 2 "
        "on branch 0 (cache_branch_id 0, as DeepCache's and T-GATE's SDXL settings), cross-attention gate_step 5 "
        "(T-GATE's count: 5 guided steps) caching the conditional maps; size ids per stage: docs/sdxl.md",
    ),
    "postdiff-pixart": (
        ScheduleKnobs(steps=20, low_res=((0.75, 10),), deepcache_interval=2, deepcache_branch=1, xattn_gate=5,
                      xattn_mode="cond"),
        "PostDiff on PixArt-alpha (ICCV 2025: beta = 3/4): first 10 of 20 steps at 3/4 side length, the block cache "
        "(DiT analogue of DeepCache, docs/pixart.md) every 2 steps on branch 1 (blocks [1, N-1) reused), "
        "cross-attention gate_step 5 (T-GATE's count: 5 guided steps) caching the conditional maps",
    ),
}


def preset_names() -> list[str]:
    """Names of the schedule presets shipped in ``profiles/schedules``."""
    return sorted(path.stem for path in SCHEDULES_DIR.glob("*.json"))


def resolve_schedule(spec: str) -> Schedule:
    """A schedule from a JSON file path or a preset name (ScheduleError listing presets otherwise)."""
    path = Path(spec)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ScheduleError(f"schedule file {path} does not exist; presets: {', '.join(preset_names())}")
        return load_schedule(path)
    if spec not in preset_names():
        raise ScheduleError(f"'{spec}' is neither a schedule file nor a preset; presets: {', '.join(preset_names())}")
    return load_schedule(SCHEDULES_DIR / f"{spec}.json")


def preset_text(name: str) -> str:
    """The JSON text of preset ``name`` as it is stored in ``profiles/schedules``."""
    knobs, description = PRESETS[name]
    return dumps(build_schedule(knobs, name, description))


def main() -> None:
    """Regenerate ``profiles/schedules/*.json`` from :data:`PRESETS`."""
    for name in PRESETS:
        write_text_atomic(SCHEDULES_DIR / f"{name}.json", preset_text(name))


if __name__ == "__main__":
    main()
