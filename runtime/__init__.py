"""The device runtime: bundle + schedule in, images out (numpy + ONNX Runtime, never torch).

The Python API, importable from here (loaded on first use, so that importing a submodule such as
``postdiff.runtime.jsonio`` does not load ONNX Runtime)::

    from postdiff.runtime import GenerateOptions, Pipeline, save_image
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "Pipeline": "postdiff.runtime.pipeline",
    "GenerateOptions": "postdiff.runtime.pipeline",
    "Generation": "postdiff.runtime.pipeline",
    "generate_batch": "postdiff.runtime.batch",
    "batch_requests": "postdiff.runtime.batch",
    "output_paths": "postdiff.runtime.batch",
    "PromptJob": "postdiff.runtime.prompts",
    "load_prompts": "postdiff.runtime.prompts",
    "save_image": "postdiff.runtime.image",
    "load_schedule": "postdiff.runtime.schedule",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'postdiff.runtime' has no attribute '{name}'")
