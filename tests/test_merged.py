"""The merged UNet graph (export --merged): every cache role an If branch over one set of weights, run by
the same executor, equal to the per-variant graphs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import PRESETS
from postdiff.runtime.manifest import DYNAMIC, load_manifest
from postdiff.runtime.pipeline import GenerateOptions, Pipeline
from postdiff.runtime.runners.base import Runner
from postdiff.profiles.presets import resolve_schedule

SCHEDULERS = ("ddim", "dpm-solver", "euler")


def test_merged_equals_per_variant_graphs_every_preset_every_scheduler(tiny_merged_bundle: Path) -> None:
    variants = Pipeline(tiny_merged_bundle, unet="variants")
    merged = Pipeline(tiny_merged_bundle, unet="merged")
    for preset in PRESETS:
        schedule = resolve_schedule(preset)
        assert merged.executor(schedule).graph_names == ["unet-merged"]
        assert "unet-merged" not in variants.executor(schedule).graph_names
        for scheduler in SCHEDULERS:
            options = GenerateOptions(prompt="a red cube", steps=len(schedule.steps), scheduler=scheduler)
            a = variants.generate(options, schedule=schedule).latents
            b = merged.generate(options, schedule=schedule).latents
            # float32 rounding of other kernel choices at dynamic shapes; the project's scaled tolerance
            assert np.max(np.abs(a - b)) <= 1e-5 * max(1.0, float(np.max(np.abs(a)))), (preset, scheduler)


def test_merged_manifest_serves_every_variant_from_the_shared_weights(tiny_merged_bundle: Path) -> None:
    manifest = load_manifest(tiny_merged_bundle)
    spec = manifest.graph(manifest.merged_unet)
    info = spec.merged
    assert {s.variant for s in info.serves} == set(manifest.unet_graphs)
    assert spec.input(info.selector).shape == () and spec.input(info.selector).dtype == "int32"
    assert DYNAMIC in spec.input("sample").shape
    # Roles, not shapes, are branches: fewer branches than served variants, each role once.
    roles = [(b.deep, b.branch, b.xattn) for b in info.branches]
    assert len(set(roles)) == len(roles) < len(info.serves)
    # One initializer per payload, every payload already in the shared file for the per-variant graphs.
    keys = list(spec.initializers.values())
    assert len(keys) == len(set(keys))
    used = {k for name, g in manifest.graphs.items() if g.merged is None for k in g.initializers.values()}
    assert set(keys) == used
    for served in info.serves:
        assert not {t.name for t in served.placeholders} & {t.name for t in served.inputs}
        assert all(DYNAMIC not in t.shape for t in served.placeholders)


def test_write_roles_cover_the_roles_without_the_write() -> None:
    """The seven cache roles of postdiff-sd15 + baseline fold into four branches: a write computes the
    role without it (one more output), a read computes nothing but itself."""
    from postdiff.exporter.merge import covering_roles

    roles = [("write", 1, "none"), ("read", 1, "none"), ("write", 1, "write"), ("write", 1, "read"),
             ("read", 1, "read"), ("none", 0, "read"), ("none", 0, "none")]
    assert covering_roles(roles) == {
        ("write", 1, "none"): ("write", 1, "write"), ("read", 1, "none"): ("read", 1, "none"),
        ("write", 1, "write"): ("write", 1, "write"), ("write", 1, "read"): ("write", 1, "read"),
        ("read", 1, "read"): ("read", 1, "read"), ("none", 0, "read"): ("write", 1, "read"),
        ("none", 0, "none"): ("write", 1, "write")}
    assert covering_roles([("none", 0, "none")]) == {("none", 0, "none"): ("none", 0, "none")}
    # a read of one DeepCache branch is not computed by a write of another
    assert covering_roles([("read", 1, "none"), ("write", 2, "none")])[("read", 1, "none")] == ("read", 1, "none")


def test_every_variant_runs_on_a_branch_that_reads_only_its_inputs(tiny_merged_bundle: Path) -> None:
    """A variant served by a wider branch (a write role for a role without it): the branch reads no input
    the variant lacks (those are placeholders, zeros) and fills every output the variant returns."""
    info = load_manifest(tiny_merged_bundle, verify=False).graph("unet-merged").merged
    assert any((b.deep, b.xattn) != (s.variant.deep, s.variant.xattn)
               for s in info.serves for b in [info.branches[s.branch]])  # some variant is folded
    for served in info.serves:
        branch = info.branches[served.branch]
        assert set(branch.inputs) <= {t.name for t in served.inputs}, served.variant
        assert {info.output_names[t.name] for t in served.outputs} <= set(branch.outputs), served.variant


def test_merged_ifs_are_flat(tiny_merged_bundle: Path) -> None:
    """TensorRT(-RTX 1.7) builds no If nested in another If's branch."""
    graph = onnx.load(str(tiny_merged_bundle / "unet-merged.onnx"), load_external_data=False).graph
    branches = load_manifest(tiny_merged_bundle, verify=False).graph("unet-merged").merged.branches
    ifs = [n for n in graph.node if n.op_type == "If"]
    assert len(ifs) == len(branches)
    for node in ifs:
        for attribute in node.attribute:
            assert not any(n.op_type == "If" for n in attribute.g.node)


def test_manifest_without_merged_graph_keeps_its_bytes(tiny_bundle: Path) -> None:
    graphs = json.loads((tiny_bundle / "manifest.json").read_text())["graphs"]
    assert all("merged" not in g for g in graphs.values())  # a field added later stays out while unset


class _Arena:
    """Output buffers shared by every runner wrapped with it, invalidated (NaN) at each new call: what a
    device runner with one activation arena does to arrays it returned before."""

    def __init__(self) -> None:
        self.handed_out: list[np.ndarray] = []


class _ReusingRunner(Runner):
    def __init__(self, inner: Runner, arena: _Arena) -> None:
        super().__init__(inner.spec)
        self.inner, self.arena = inner, arena

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for old in self.arena.handed_out:  # the arena is reused before this call reads its feed
            old.fill(np.nan)
        outputs = self.inner.infer(feed)
        self.arena.handed_out = [value.copy() for value in outputs.values()]
        return dict(zip(outputs, self.arena.handed_out))


@pytest.mark.parametrize("unet", ["variants", "merged"])
def test_executor_copies_what_it_keeps_across_calls(tiny_merged_bundle: Path, unet: str) -> None:
    schedule = resolve_schedule("postdiff-sd15")
    plain = Pipeline(tiny_merged_bundle, unet=unet)
    reusing = Pipeline(tiny_merged_bundle, unet=unet)
    arena = _Arena()
    runner = reusing.runner
    reusing.runner = lambda name: _ReusingRunner(runner(name), arena)  # type: ignore[method-assign]
    options = GenerateOptions(prompt="a red cube", steps=len(schedule.steps))
    expected = plain.generate(options, schedule=schedule).latents
    got = reusing.generate(options, schedule=schedule).latents
    np.testing.assert_array_equal(got, expected)
