"""One UNet graph for every cache role of a bundle: the roles are ``If`` branches over one set of weights.

A TensorRT engine embeds its weights, so one engine per graph variant holds them once per variant
(measured 5.9-6.6x for ``postdiff-sd15``). One engine stores each weight once however many layers,
or ``If`` branches, use it. :func:`merge_branches` therefore builds one ONNX graph from the
dynamic-shape traces of each cache role (plain, DeepCache write/read, cross-attention write/read
and their combinations): an int32 scalar ``selector`` input chooses the branch; every branch reads
the same top-level initializers, one per distinct payload, so the weights live once in the graph,
in the shared weights file and in an engine built from it. A role that a wider role computes (a
cache write is the plain computation plus an output) gets no branch of its own
(:func:`covering_roles`): TensorRT compiles every branch once per optimization profile, so the
branches, not the weights, are what the engine grows with.

Three TensorRT rules shape the selection (measured with TensorRT-RTX 1.7, docs/tensorrt.md): an
``If`` nested in another's branch does not build; both branches of an ``If`` must return equal
shapes; and a tensor whose shape depends on an ``If`` may not enter another ``If``'s branch. So
every branch k is one top-level ``If(sel == k, branch_k, pass)`` returning only the outputs it
computes, where ``pass`` returns inputs of the same shapes unchanged (``sample`` for
``noise_pred``, a cache input for the cache output of its name, fed by the runtime with zeros:
``ServedVariant.placeholders``); and each output is picked among the branches that compute it by
``Where(sel == k, r_k, ...)`` at the top level.

Contract of the merged graph (recorded in the manifest as ``GraphSpec.merged``):

* inputs: the selector, then the union of the branches' inputs under their per-variant names, plus
  a cache input for every cache output; batch and spatial sides are free. A branch ignores the
  inputs it does not read, which the runtime fills with zeros (placeholders).
* outputs: ``noise_pred`` and the cache outputs renamed (:func:`merged_output_name`); where the
  selected branch does not compute a cache output, its value is unspecified (the runtime ignores it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from postdiff.runtime import names
from postdiff.errors import ModelSourceError
from postdiff.runtime.manifest import DYNAMIC, MergedBranch, TensorSpec

SELECTOR = "unet_branch"
WEIGHT_PREFIX = "w/"  # top-level initializer names: w/<payload key>


@dataclass(frozen=True)
class BranchGraph:
    """One traced cache role: its graph (large initializers already external, see ``WeightStore``) and
    the payload key of each externalized initializer."""

    deep: str
    branch: int
    xattn: str
    model: onnx.ModelProto
    initializers: dict[str, str]  # initializer name -> payload key (WeightStore.externalize)


Role = tuple[str, int, str]  # (deep, DeepCache branch id, xattn) of a UNet variant


def _computes(wide: Role, narrow: Role) -> bool:
    """Whether the branch of role ``wide`` returns every output of role ``narrow`` from ``narrow``'s own
    inputs. A cache *write* is the plain computation plus one more output, so a write role computes the
    role without it: (write, b, x) computes (none, 0, x), and (d, b, write) computes (d, b, none)."""
    (deep, branch, xattn), (deep0, branch0, xattn0) = wide, narrow
    deep_ok = (deep, branch) == (deep0, branch0) or (deep0 == "none" and deep == "write")
    return deep_ok and (xattn == xattn0 or (xattn0 == "none" and xattn == "write"))


def covering_roles(roles: Sequence[Role]) -> dict[Role, Role]:
    """Each role -> the role whose branch computes it in the merged graph: the first (in ``roles``'
    order) of the roles no other role computes. TensorRT compiles every branch once per optimization
    profile, so each role folded into a wider one removes a branch's plan from every profile; the
    wider branch's extra cache outputs are ignored (the variant's outputs are its own)."""
    kept = [r for r in roles if not any(o != r and _computes(o, r) for o in roles)]
    return {r: next(k for k in kept if _computes(k, r)) for r in roles}


def merged_output_name(name: str) -> str:
    """The merged graph's name for a per-variant output: cache outputs get ``out/`` (their per-variant
    name is also an input of the merged graph), ``noise_pred`` keeps its own."""
    return name if name == names.NOISE_PRED else f"out/{name}"


def merge_branches(branches: Sequence[BranchGraph]) -> tuple[onnx.ModelProto, tuple[MergedBranch, ...], dict[str, str]]:
    """Build the merged UNet graph.

    Returns:
        the model, its branches (``index`` = selector value), and initializer name -> payload key for
        every external initializer of the merged graph (the manifest's ``initializers``).

    Raises:
        ModelSourceError: no branches, or branches that disagree on an input's dtype or rank.
    """
    if not branches:
        raise ModelSourceError("a merged UNet needs at least one branch; export with at least one schedule")
    inputs = _union_inputs([b.model.graph for b in branches])
    outputs = _union_outputs([b.model.graph for b in branches])
    for value in outputs:  # each cache output has an input to pass through where a branch does not compute it
        source = next(v for b in branches for v in b.model.graph.output if merged_output_name(v.name) == value.name)
        if source.name != names.NOISE_PRED and source.name not in inputs:
            inputs[source.name] = onnx.ValueInfoProto()
            inputs[source.name].CopyFrom(source)
    top_initializers: dict[str, onnx.TensorProto] = {}
    external: dict[str, str] = {}
    bodies, roles, computed_sets = [], [], []
    sample = inputs.get(names.SAMPLE)
    noise = next(v for v in branches[0].model.graph.output if v.name == names.NOISE_PRED)
    if sample is None or _rank_and_type(sample) != _rank_and_type(noise) or \
            sample.type.tensor_type.shape.dim[1].dim_value != noise.type.tensor_type.shape.dim[1].dim_value:
        raise ModelSourceError("merged UNet: noise_pred must have the shape of sample (a UNet whose output channels "
                               "equal its input channels, as SD 1.x/2.x); export without --merged")
    for index, branch in enumerate(branches):
        rename = _lift_initializers(branch, top_initializers, external)
        computed = {merged_output_name(v.name) for v in branch.model.graph.output}
        computed_sets.append(computed)
        bodies.append(_branch_body(index, branch.model.graph, rename, [v for v in outputs if v.name in computed]))
        roles.append(MergedBranch(
            index=index, deep=branch.deep, branch=branch.branch, xattn=branch.xattn,
            inputs=tuple(v.name for v in branch.model.graph.input),
            outputs=tuple(merged_output_name(v.name) for v in branch.model.graph.output)))
    graph_inputs = [helper.make_tensor_value_info(SELECTOR, onnx.TensorProto.INT32, [])] if len(bodies) > 1 else []
    graph_inputs += list(inputs.values())
    nodes = _select_chain(bodies, computed_sets, [v.name for v in outputs])
    graph = helper.make_graph(nodes, "unet_merged", graph_inputs, outputs,
                              initializer=[top_initializers[k] for k in sorted(top_initializers)])
    first = branches[0].model
    model = helper.make_model(graph, opset_imports=list(first.opset_import), producer_name=first.producer_name,
                              producer_version=first.producer_version)
    model.ir_version = first.ir_version
    return model, tuple(roles), external


def _rank_and_type(value: onnx.ValueInfoProto) -> tuple[int, int]:
    return len(value.type.tensor_type.shape.dim), value.type.tensor_type.elem_type


def tensor_specs(values: Sequence[onnx.ValueInfoProto]) -> tuple[TensorSpec, ...]:
    """Manifest specs of graph inputs or outputs; a free (symbolic) side becomes ``DYNAMIC``."""
    specs = []
    for value in values:
        tensor_type = value.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        shape = tuple(d.dim_value if d.HasField("dim_value") else DYNAMIC for d in tensor_type.shape.dim)
        specs.append(TensorSpec(name=value.name, shape=shape, dtype=dtype))
    return tuple(specs)


def _union_inputs(graphs: Sequence[onnx.GraphProto]) -> dict[str, onnx.ValueInfoProto]:
    """Every branch input once; a side the branches disagree on becomes free."""
    union: dict[str, onnx.ValueInfoProto] = {}
    for graph in graphs:
        for value in graph.input:
            if value.name not in union:
                union[value.name] = onnx.ValueInfoProto()
                union[value.name].CopyFrom(value)
                continue
            have, new = union[value.name].type.tensor_type, value.type.tensor_type
            if have.elem_type != new.elem_type or len(have.shape.dim) != len(new.shape.dim):
                raise ModelSourceError(f"merged UNet: the branches disagree on input '{value.name}' "
                                       "(dtype or rank); every branch must be traced from one UNet")
            for axis, (a, b) in enumerate(zip(have.shape.dim, new.shape.dim)):
                if a.HasField("dim_value") and (not b.HasField("dim_value") or a.dim_value != b.dim_value):
                    a.dim_param = f"{value.name}#{axis}"  # e.g. two DeepCache branches' feature widths
    return union


def _union_outputs(graphs: Sequence[onnx.GraphProto]) -> list[onnx.ValueInfoProto]:
    """``noise_pred`` first, then every cache output once (renamed), with its dtype and rank."""
    found: dict[str, onnx.ValueInfoProto] = {}
    for graph in graphs:
        for value in graph.output:
            name = merged_output_name(value.name)
            if name not in found:
                tensor_type = value.type.tensor_type
                rank = len(tensor_type.shape.dim)
                found[name] = helper.make_tensor_value_info(
                    name, tensor_type.elem_type, [f"{name}#{axis}" for axis in range(rank)])
    ordered = sorted(found, key=lambda n: (n != names.NOISE_PRED, n))
    return [found[n] for n in ordered]


def _payload_key(tensor: onnx.TensorProto) -> str:
    """Content key of an inline initializer, in the spirit of ``WeightStore``'s (dtype, shape, bytes)."""
    array = numpy_helper.to_array(tensor)
    digest = hashlib.sha256(f"{array.dtype.name}{list(array.shape)}".encode())
    digest.update(array.tobytes())
    return "c" + digest.hexdigest()[:24]


def _lift_initializers(branch: BranchGraph, top: dict[str, onnx.TensorProto], external: dict[str, str]) -> dict[str, str]:
    """Move ``branch``'s initializers to the top level, one per distinct payload; returns old -> new names."""
    rename = {}
    for tensor in branch.model.graph.initializer:
        key = branch.initializers.get(tensor.name) or _payload_key(tensor)
        name = WEIGHT_PREFIX + key
        if name not in top:
            lifted = onnx.TensorProto()
            lifted.CopyFrom(tensor)
            lifted.name = name
            top[name] = lifted
            if tensor.name in branch.initializers:
                external[name] = key
        rename[tensor.name] = name
    return rename


def _branch_body(index: int, graph: onnx.GraphProto, rename: dict[str, str],
                 outputs: Sequence[onnx.ValueInfoProto]) -> onnx.GraphProto:
    """The ``If`` branch of one role: its nodes with private value names (``b<index>/...``), reading the
    outer graph's inputs and lifted initializers, returning ``outputs`` (those it computes) in order."""
    prefix = f"b{index}/"
    outer = {v.name for v in graph.input}
    local: dict[str, str] = {}

    def resolve(name: str) -> str:
        if not name or name in outer:
            return name
        return rename.get(name) or local[name]

    nodes = []
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ModelSourceError(f"merged UNet: node {node.name} ({node.op_type}) has a subgraph; "
                                   "the traced UNet branches are expected to be flat")
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = prefix + node.name
        del copy.input[:]
        copy.input.extend(resolve(n) for n in node.input)
        del copy.output[:]
        for out in node.output:
            local[out] = prefix + out if out else ""
            copy.output.append(local[out])
        nodes.append(copy)
    produced = {merged_output_name(v.name): resolve(v.name) for v in graph.output}
    body_outputs = []
    for value in outputs:
        tensor_type = value.type.tensor_type
        source = produced[value.name]
        if source in outer:  # an If output must be produced inside the branch
            nodes.append(helper.make_node("Identity", [source], [prefix + "id/" + value.name]))
            source = prefix + "id/" + value.name
        body_outputs.append(helper.make_tensor_value_info(source, tensor_type.elem_type,
                                                          [None] * len(tensor_type.shape.dim)))
    return helper.make_graph(nodes, f"branch{index}", [], body_outputs)


def _passthrough(name: str) -> str:
    """The input whose value (and shape) a non-selected branch returns for merged output ``name``."""
    return names.SAMPLE if name == names.NOISE_PRED else name[len("out/"):]


def _select_chain(bodies: Sequence[onnx.GraphProto], computed: Sequence[set[str]],
                  outputs: Sequence[str]) -> list[onnx.NodeProto]:
    """Nodes computing ``outputs`` from the branch the selector names (see the module docstring): one
    top-level If per branch, then per output a Where chain over the branches that compute it.
    One branch needs no selection: its nodes become the graph's own."""
    if len(bodies) == 1:
        body = bodies[0]
        nodes = list(body.node)
        nodes += [helper.make_node("Identity", [v.name], [name]) for v, name in zip(body.output, outputs)]
        return nodes
    nodes: list[onnx.NodeProto] = []
    computed_by: dict[str, list[tuple[str, str]]] = {name: [] for name in outputs}  # output -> [(take, value)]
    for index, body in enumerate(bodies):
        level = f"sel{index}/"
        mine = [name for name in outputs if name in computed[index]]  # body.output is in this order
        targets = [level + name for name in mine]
        passed = [level + "pass/" + name for name in mine]
        otherwise = helper.make_graph(
            [helper.make_node("Identity", [_passthrough(name)], [p]) for name, p in zip(mine, passed)],
            f"pass{index}", [], [helper.make_tensor_value_info(p, o.type.tensor_type.elem_type,
                                                                [None] * len(o.type.tensor_type.shape.dim))
                                 for p, o in zip(passed, body.output)])
        nodes += [
            helper.make_node("Constant", [], [level + "index"], value=numpy_helper.from_array(np.array(index, np.int32))),
            helper.make_node("Equal", [SELECTOR, level + "index"], [level + "take"]),
            helper.make_node("If", [level + "take"], targets, name=level + "if", then_branch=body,
                             else_branch=otherwise),
        ]
        for name, target in zip(mine, targets):
            computed_by[name].append((level + "take", target))
    for name, candidates in computed_by.items():
        value = candidates[0][1]
        for k, (take, candidate) in enumerate(candidates[1:], start=1):
            picked = name if k == len(candidates) - 1 else f"pick{k}/{name}"
            nodes.append(helper.make_node("Where", [take, candidate, value], [picked]))
            value = picked
        if len(candidates) == 1:
            nodes.append(helper.make_node("Identity", [value], [name]))
    return nodes
