"""Multiply-accumulate counts of an ONNX graph, from its static shapes.

Counted: Conv (output elements x input channels per group x kernel area), ConvTranspose, MatMul and
Gemm (output elements x contraction length) — which covers every UNet convolution, linear layer and
both attention products (QK^T and AV). Element-wise ops, norms and softmax are left out, as in the
papers' MAC figures.
"""

from __future__ import annotations

import math

import onnx
from onnx import helper
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

SHAPE_ONLY_BYTES = 1024  # initializers at least this large become shape-only inputs for inference


def count_macs(model: onnx.ModelProto) -> int:
    """Total MACs of one call of ``model``.

    Weights never decide shapes, so large initializers are replaced by inputs of the same shape
    before inference: the graph need not have its weights loaded, and stays far below protobuf's
    2 GB limit even at SD scale.
    """
    inferred = SymbolicShapeInference.infer_shapes(_shape_only(model), auto_merge=True)
    shapes: dict[str, list[int]] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value for d in dims]
    for tensor in inferred.graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    total = 0
    for node in inferred.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if not out or 0 in out:
            continue
        if node.op_type in ("Conv", "ConvTranspose"):
            weight = shapes.get(node.input[1])
            if weight:
                per_output = weight[1] * math.prod(weight[2:]) if node.op_type == "Conv" else \
                    weight[0] * math.prod(weight[2:]) / max(1, out[1])
                total += int(math.prod(out) * per_output)
        elif node.op_type in ("MatMul", "Gemm"):
            left = shapes.get(node.input[0])
            if left:
                transposed = node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute)
                total += math.prod(out) * (left[0] if transposed else left[-1])
    return int(total)


def _shape_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large initializers are graph inputs (dims kept, no data)."""
    light = onnx.ModelProto()
    _copy_without_payloads(model, light)
    kept, moved = [], []
    for tensor in light.graph.initializer:
        size = math.prod(tensor.dims) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        (moved if size >= SHAPE_ONLY_BYTES else kept).append(tensor)
    del light.graph.initializer[:]
    light.graph.initializer.extend(kept)
    light.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in moved)
    return light


def _copy_without_payloads(model: onnx.ModelProto, light: onnx.ModelProto) -> None:
    """Copy ``model`` into ``light`` without duplicating large in-memory payloads."""
    graph = model.graph
    big = [t for t in graph.initializer if len(t.raw_data) >= SHAPE_ONLY_BYTES]
    saved = [t.raw_data for t in big]
    for tensor in big:
        tensor.ClearField("raw_data")
    try:
        light.CopyFrom(model)
    finally:
        for tensor, raw in zip(big, saved):
            tensor.raw_data = raw
