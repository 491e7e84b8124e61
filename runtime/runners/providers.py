"""The one registry of execution providers: every ``--provider`` choice and the backend behind it.

Importing this module imports no backend, so the command line can list the choices (and reject a
wrong one) without loading onnxruntime or OpenVINO. The runner modules read their backend-specific
settings from here; nothing else keeps a list of provider names.
"""

from __future__ import annotations

from dataclasses import dataclass

from postdiff.errors import InputError


@dataclass(frozen=True)
class Provider:
    """One ``--provider`` choice.

    ``backend`` names the runner module (``onnxruntime``: :mod:`.ort`, ``openvino``: :mod:`.openvino`,
    ``tensorrt``: :mod:`.tensorrt`);
    ``target`` is what that backend calls the device (an ONNX Runtime execution provider, an
    OpenVINO device name); ``install`` says how to get it when it is missing.
    """

    name: str
    backend: str
    target: str
    summary: str
    install: str
    gpu: bool = False  # runs on a GPU (profiles then record GPU memory)


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("cpu", "onnxruntime", "CPUExecutionProvider", "ONNX Runtime on the CPU", "pip install onnxruntime"),
    Provider("cuda", "onnxruntime", "CUDAExecutionProvider", "ONNX Runtime on an NVIDIA GPU (CUDA)",
             "pip install onnxruntime-gpu", gpu=True),
    Provider("tensorrt", "tensorrt", "engines", "postdiff's TensorRT runner on the engines of `postdiff compile` "
             "(caches stay on the GPU)", 'TensorRT (JetPack on Jetson) and pip install "postdiff[tensorrt]"', gpu=True),
    Provider("ort-tensorrt", "onnxruntime", "TensorrtExecutionProvider",
             "ONNX Runtime's TensorRT execution provider (an engine, and a copy of the weights, per graph)",
             "pip install onnxruntime-gpu (and TensorRT)", gpu=True),
    Provider("openvino", "openvino", "CPU", "OpenVINO on the CPU (bf16 where the CPU has it)",
             'pip install "postdiff[openvino]"'),
)}
DEFAULT_PROVIDER = "cpu"
# Inference precisions a runtime command can ask for (``--precision``); "auto" is the backend's
# default: the graphs' own under ONNX Runtime, the CPU's fastest float type under OpenVINO.
AUTO_PRECISION = "auto"
RUNTIME_PRECISIONS = (AUTO_PRECISION, "fp32", "bf16")


def provider_names() -> list[str]:
    """Every provider name, in registry order (the ``--provider`` choices)."""
    return list(PROVIDERS)


def get_provider(name: str) -> Provider:
    """The provider called ``name``; InputError naming the choices otherwise."""
    if name not in PROVIDERS:
        raise InputError(f"unknown provider '{name}'; expected one of {provider_names()}")
    return PROVIDERS[name]


def providers_help() -> str:
    """One line for ``--help``: each choice and what it runs on."""
    return "; ".join(f"{p.name}: {p.summary}" for p in PROVIDERS.values())
