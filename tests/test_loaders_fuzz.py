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


# --- the JSON documents: manifest, schedule, device profile ---------------------------------------------

# kind -> (file name it is written as, loader of that file, what the loader returns)
LOADERS: dict[str, tuple[str, Callable[[Path], Any], type]] = {
    "manifest": (MANIFEST_NAME, lambda path: load_manifest(path.parent, verify=False), Manifest),
    "schedule": ("schedule.json", load_schedule, Schedule),
    "device profile": ("device.json", load_device_profile, DeviceProfile),
}


@pytest.fixture(scope="module")
def valid_docs(tiny_bundle: Path) -> dict[str, Any]:
    """A valid document of each kind: what the mutations start from."""
    return {"manifest": json.loads((tiny_bundle / MANIFEST_NAME).read_text()),
            "schedule": json.loads((SCHEDULES_DIR / "postdiff-sd15.json").read_text()),
            "device profile": json.loads((SCHEDULES_DIR.parent / "devices" / "cpu-2core-digits.json").read_text())}


def _load_bytes(folder: Path, kind: str, data: bytes) -> Callable[[], Any]:
    file, load, _ = LOADERS[kind]
    path = folder / file
    path.write_bytes(data)
    return lambda: load(path)


@pytest.mark.parametrize("kind", LOADERS)
@SETTINGS
@given(data=st.binary(max_size=300))
def test_document_from_any_bytes(scratch: Path, kind: str, data: bytes) -> None:
    loads_cleanly(_load_bytes(scratch, kind, data), LOADERS[kind][2])


@pytest.mark.parametrize("kind", LOADERS)
@SETTINGS
@given(data=st.data())
def test_document_with_any_part_replaced(scratch: Path, valid_docs: dict[str, Any], kind: str,
                                         data: st.DataObject) -> None:
    loads_cleanly(_load_bytes(scratch, kind, encoded(mutate(valid_docs[kind], data))), LOADERS[kind][2])


@pytest.mark.parametrize("kind", LOADERS)
def test_the_valid_documents_load(scratch: Path, valid_docs: dict[str, Any], kind: str) -> None:
    assert isinstance(_load_bytes(scratch, kind, encoded(valid_docs[kind]))(), LOADERS[kind][2])


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
