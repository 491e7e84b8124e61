"""All UNet graphs of a bundle as one OpenVINO compiled model, sharing what OpenVINO lets them share.

OpenVINO's CPU plugin repacks every weight it compiles (blocked layouts, and a bf16 copy at bf16)
into a weights cache that belongs to one compiled model, keyed by the weight's source memory and the
packed layout. UNet
variants compiled one by one therefore hold one packed copy each -- even when their ONNX files
reference one external weights file. Here they are compiled together instead:

* every graph is read from its ONNX file as it is (no re-export);
* each initializer the manifest maps to one payload of the shared weights file
  (``GraphSpec.initializers``) becomes one ``Constant`` node that all graphs use, so the plugin
  packs it once;
* each graph becomes the ``then`` body of an ``If`` on an extra ``variant`` input: ``variant == i``
  runs graph ``i``; every other ``If`` takes its empty ``else`` (one-element placeholders). The
  ``If`` operations sit side by side in one model, each with outputs of its own (``i:noise_pred``).

How much this saves, measured (OpenVINO 2026.4, CPU, the nine UNet graphs of postdiff-sd15 on a
0.4x-width SD-1.5-layout model at 256x256, 542 MB of weights; proportional set after one call each):
fp32 1.8 GB as one model vs 4.3 GB compiled one by one; bf16 2.4 GB vs 3.1 GB. It is not one copy:
oneDNN picks a weight's packed layout by each graph's batch and resolution, and each layout is packed
once more (docs/openvino.md, "Where the variant set's extra memory goes"); at bf16 each body also
converts the shared f32 weights to bf16 for itself (a shared bf16 Constant + Convert pattern was worse: the plugin decompresses it
per body). ONNX Runtime's shared initializers hold the same set in 1.3x the weights.

Each graph keeps a :class:`Runner` of its own (:meth:`OpenVinoVariantSet.runner`): it feeds its own
inputs and a placeholder for every input of the other graphs, selects its branch, and returns its
own outputs. Results are those of the graph compiled alone (the branch *is* that graph).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from postdiff.errors import BundleError
from postdiff.runtime.manifest import GraphSpec, Manifest
from postdiff.runtime.runners.base import Runner
from postdiff.runtime.runners.openvino import compile_config, core, openvino_module, precision_name, resolve_precision

SELECTOR = "variant"  # the extra input choosing the branch (an int32 scalar)


def _output_name(index: int, name: str) -> str:
    """Name of graph ``index``'s output ``name`` in the merged model (each graph has its own)."""
    return f"{index}:{name}"


def _placeholder(rank: int, dtype: str) -> np.ndarray:
    """A one-element array of ``rank`` dimensions: what an input of another branch receives."""
    return np.zeros((1,) * rank, dtype=dtype)


class OpenVinoVariantSet:
    """Several UNet graphs of one bundle compiled as one OpenVINO model (weights packed once)."""

    def __init__(self, bundle: Path, manifest: Manifest, names: Sequence[str], precision: str = "auto",
                 threads: int | None = None) -> None:
        """Read, merge and compile the graphs ``names`` (UNet graphs of ``manifest``).

        Raises:
            InputError: OpenVINO missing, or a precision this CPU lacks.
            BundleError: a graph OpenVINO cannot read, or graphs that disagree on an input's rank or dtype.
        """
        ov = openvino_module()
        self.names = list(names)
        self.specs = {name: manifest.graph(name) for name in self.names}
        wanted = resolve_precision(precision)
        self._inputs = self._union([t for n in self.names for t in self.specs[n].inputs], "input")
        models = [self._read(Path(bundle), self.specs[name]) for name in self.names]
        self.shared_constants = self._share_constants(models)
        opset = ov.opset13
        params = self._parameters()
        selector = opset.parameter([], ov.Type.i32, name=SELECTOR)
        selector.output(0).set_names({SELECTOR})
        results = []
        for index, model in enumerate(models):
            for tensor, value in zip(self.specs[self.names[index]].outputs,
                                     self._branch(model, index, params, selector.output(0))):
                result = opset.result(value)
                result.output(0).set_names({_output_name(index, tensor.name)})
                results.append(result)
        merged = ov.Model(results, [selector, *params.values()], "postdiff-unet-variants")
        try:
            self.compiled = core().compile_model(merged, "CPU", compile_config(wanted, threads))
        except Exception as exc:  # openvino raises untyped RuntimeErrors
            raise BundleError(f"OpenVINO could not compile the {len(self.names)} UNet graphs of {bundle} as one model "
                              f"({str(exc).strip().splitlines()[-1]}); use --weights per-session or "
                              "--provider cpu") from None
        self.precision = precision_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        self._request = self.compiled.create_infer_request()
        self._ports = {(name, t.name): self.compiled.output(_output_name(i, t.name))
                       for i, name in enumerate(self.names) for t in self.specs[name].outputs}
        self._placeholders = {name: _placeholder(rank, dtype) for name, (rank, dtype) in self._inputs.items()}

    @staticmethod
    def _union(tensors: list, kind: str) -> dict[str, tuple[int, str]]:
        """name -> (rank, dtype) over all graphs; BundleError when two graphs disagree."""
        union: dict[str, tuple[int, str]] = {}
        for tensor in tensors:
            seen = union.setdefault(tensor.name, (len(tensor.shape), tensor.dtype))
            if seen != (len(tensor.shape), tensor.dtype):
                raise BundleError(f"UNet graphs disagree on {kind} '{tensor.name}': rank/dtype {seen} and "
                                  f"{(len(tensor.shape), tensor.dtype)}; re-export the bundle")
        return union

    @staticmethod
    def _read(bundle: Path, spec: GraphSpec) -> Any:
        path = bundle / spec.file
        try:
            return core().read_model(str(path))
        except Exception as exc:  # openvino raises untyped RuntimeErrors
            raise BundleError(f"{path} could not be read by OpenVINO ({str(exc).strip().splitlines()[-1]}); "
                              "re-export the bundle") from None

    def _share_constants(self, models: list) -> int:
        """Point every graph's initializer at one Constant per weights-file payload; returns how many
        Constants are shared by more than one graph."""
        canonical: dict[tuple, Any] = {}
        users: dict[tuple, int] = {}
        for name, model in zip(self.names, models):
            keys = self.specs[name].initializers
            for op in model.get_ordered_ops():
                if op.get_type_name() != "Constant" or op.get_friendly_name() not in keys:
                    continue
                key = (keys[op.get_friendly_name()], tuple(op.get_output_shape(0)), op.get_element_type().get_type_name())
                first = canonical.setdefault(key, op)
                users[key] = users.get(key, 0) + 1
                if first is not op:
                    op.output(0).replace(first.output(0))
        return sum(1 for count in users.values() if count > 1)

    def _parameters(self) -> dict[str, Any]:
        """One dynamic-shape Parameter per input name of any graph."""
        ov = openvino_module()
        params = {}
        for name, (rank, dtype) in self._inputs.items():
            param = ov.opset13.parameter(ov.PartialShape.dynamic(rank), ov.Type(np.dtype(dtype)), name=name)
            param.output(0).set_names({name})
            params[name] = param
        return params

    def _branch(self, model: Any, index: int, params: dict[str, Any], selector: Any) -> list:
        """``If(selector == index)``: then ``model`` (graph ``index``), else placeholders; its outputs,
        one per output of the graph, in the graph's manifest order."""
        ov = openvino_module()
        opset = ov.opset13
        spec = self.specs[self.names[index]]
        own = {}
        for result in model.get_results():
            own.update({name: result for name in result.output(0).get_names() | result.input_value(0).get_names()})
        then_results = [own[t.name] for t in spec.outputs]
        else_results = [opset.result(opset.constant(_placeholder(len(t.shape), t.dtype))) for t in spec.outputs]
        branch = opset.if_op(opset.equal(selector, opset.constant(np.int32(index))).output(0))
        branch.set_then_body(model)
        branch.set_else_body(ov.Model(else_results, [], f"skip-{index}"))
        for param in model.get_parameters():
            branch.set_input(params[param.get_friendly_name()].output(0), param, None)
        return [branch.set_output(then, other) for then, other in zip(then_results, else_results)]

    def runner(self, name: str) -> Runner:
        """The runner of graph ``name`` (one of ``names``)."""
        return _BranchRunner(self, name)

    def infer(self, name: str, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run graph ``name``'s branch on ``feed``; its outputs, copied."""
        full = dict(self._placeholders)
        full.update(feed)
        full[SELECTOR] = np.array(self.names.index(name), dtype=np.int32)
        results = self._request.infer(full)  # copies (share_outputs=False)
        return {t.name: results[self._ports[name, t.name]] for t in self.specs[name].outputs}


class _BranchRunner(Runner):
    """One graph of an :class:`OpenVinoVariantSet`."""

    def __init__(self, owner: OpenVinoVariantSet, name: str) -> None:
        super().__init__(owner.specs[name])
        self._owner = owner
        self._name = name

    @property
    def precision(self) -> str:
        return self._owner.precision

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._owner.infer(self._name, feed)
