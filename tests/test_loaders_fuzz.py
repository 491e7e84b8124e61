"""Every loader the device runs, fed anything: a valid object or one clean PostdiffError, never another
exception (property-based, hypothesis). Loaders: manifest, schedule, device profile, prompts file,
and the verification stamp (which, damaged, is ignored rather than refused)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postdiff.errors import PostdiffError
from postdiff.profiles.device import DeviceProfile, load_device_profile
from postdiff.profiles.presets import SCHEDULES_DIR
from postdiff.runtime.manifest import MANIFEST_NAME, Manifest, load_manifest
from postdiff.runtime.prompts import PromptJob, parse_prompts
from postdiff.runtime.schedule import Schedule, load_schedule
from postdiff.runtime.stamp import STAMP_NAME, Stamp, read_stamp

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)


def mutate(document: Any, data: st.DataObject) -> Any:
    """A copy of ``document`` with one subtree replaced by an arbitrary JSON value, or deleted."""
    document = copy.deepcopy(document)
    parent, key, node = None, None, document
    while isinstance(node, (dict, list)) and node and data.draw(st.booleans(), label="descend"):
        keys = sorted(node) if isinstance(node, dict) else list(range(len(node)))
        parent, key = node, data.draw(st.sampled_from(keys), label="key")
        node = parent[key]
    if parent is None:
        return data.draw(json_values, label="document")
    if data.draw(st.booleans(), label="delete") and isinstance(parent, dict):
        del parent[key]
    else:
        parent[key] = data.draw(json_values, label="value")
    return document


def loads_cleanly(load: Callable[[], Any], cls: type) -> None:
    try:
        result = load()
    except PostdiffError:
        return
    assert isinstance(result, cls)


def encoded(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def manifest_doc(tiny_bundle: Path) -> Any:
    return json.loads((tiny_bundle / MANIFEST_NAME).read_text())


# --- manifest ----------------------------------------------------------------------------------------

def _load_manifest_bytes(folder: Path, data: bytes) -> Callable[[], Manifest]:
    (folder / MANIFEST_NAME).write_bytes(data)
    return lambda: load_manifest(folder, verify=False)


@SETTINGS
@given(data=st.binary(max_size=300))
def test_manifest_from_any_bytes(scratch: Path, data: bytes) -> None:
    loads_cleanly(_load_manifest_bytes(scratch, data), Manifest)


@SETTINGS
@given(data=st.data())
def test_manifest_with_any_part_replaced(scratch: Path, manifest_doc: Any, data: st.DataObject) -> None:
    loads_cleanly(_load_manifest_bytes(scratch, encoded(mutate(manifest_doc, data))), Manifest)


def test_the_real_manifest_loads(scratch: Path, manifest_doc: Any) -> None:  # the mutations start from a valid one
    assert isinstance(_load_manifest_bytes(scratch, encoded(manifest_doc))(), Manifest)


# --- schedule ------------------------------------------------------------------------------------------

SCHEDULE_DOC = json.loads((SCHEDULES_DIR / "postdiff-sd15.json").read_text())


def _load_schedule_bytes(folder: Path, data: bytes) -> Callable[[], Schedule]:
    path = folder / "schedule.json"
    path.write_bytes(data)
    return lambda: load_schedule(path)


@SETTINGS
@given(data=st.binary(max_size=300))
def test_schedule_from_any_bytes(scratch: Path, data: bytes) -> None:
    loads_cleanly(_load_schedule_bytes(scratch, data), Schedule)


@SETTINGS
@given(data=st.data())
def test_schedule_with_any_part_replaced(scratch: Path, data: st.DataObject) -> None:
    loads_cleanly(_load_schedule_bytes(scratch, encoded(mutate(SCHEDULE_DOC, data))), Schedule)


# --- device profile ------------------------------------------------------------------------------------

PROFILE_DOC = json.loads((SCHEDULES_DIR.parent / "devices" / "cpu-2core-digits.json").read_text())


def _load_profile_bytes(folder: Path, data: bytes) -> Callable[[], DeviceProfile]:
    path = folder / "device.json"
    path.write_bytes(data)
    return lambda: load_device_profile(path)


@SETTINGS
@given(data=st.binary(max_size=300))
def test_device_profile_from_any_bytes(scratch: Path, data: bytes) -> None:
    loads_cleanly(_load_profile_bytes(scratch, data), DeviceProfile)


@SETTINGS
@given(data=st.data())
def test_device_profile_with_any_part_replaced(scratch: Path, data: st.DataObject) -> None:
    loads_cleanly(_load_profile_bytes(scratch, encoded(mutate(PROFILE_DOC, data))), DeviceProfile)


# --- prompts file --------------------------------------------------------------------------------------

def _parsed(data: bytes) -> tuple[PromptJob, ...]:
    jobs = parse_prompts(data)
    assert jobs and all(isinstance(job, PromptJob) for job in jobs)
    return jobs


@SETTINGS
@given(data=st.binary(max_size=300))
def test_prompts_from_any_bytes(data: bytes) -> None:
    loads_cleanly(lambda: _parsed(data), tuple)


@SETTINGS
@given(lines=st.lists(json_values | st.fixed_dictionaries(
    {"prompt": st.text(max_size=20)}, optional={"negative_prompt": st.text(max_size=8), "seed": json_values}),
    min_size=1, max_size=4))
def test_prompts_from_any_json_lines(lines: list[Any]) -> None:
    data = "\n".join(json.dumps(line) for line in lines).encode("utf-8")
    loads_cleanly(lambda: _parsed(data), tuple)


# --- verification stamp: damaged is never an error, just not trusted ------------------------------------

@SETTINGS
@given(data=st.binary(max_size=200) | json_values.map(encoded))
def test_a_damaged_stamp_is_ignored(scratch: Path, data: bytes) -> None:
    (scratch / STAMP_NAME).write_bytes(data)
    assert read_stamp(scratch) is None or isinstance(read_stamp(scratch), Stamp)
