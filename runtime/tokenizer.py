"""Prompt tokenizer: a tokenizers-library JSON file, padded and truncated as the encoder expects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from postdiff.runtime.errors import BundleError
from postdiff.runtime.manifest import TokenizerSpec


class PromptTokenizer:
    """Turns a prompt into the fixed-length id row the text encoder graph takes."""

    def __init__(self, spec: TokenizerSpec, bundle: Path) -> None:
        path = Path(bundle) / spec.file
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises plain Exceptions
            raise BundleError(f"{path} is not a readable tokenizer file ({exc}); re-export the bundle") from None
        self._tokenizer.enable_truncation(spec.max_length)
        self._tokenizer.enable_padding(length=spec.max_length, pad_id=spec.pad_id)
        self.max_length = spec.max_length

    def encode(self, text: str, dtype: str = "int64") -> np.ndarray:
        """Token ids of ``text`` with start/end tokens, padded to ``max_length``: shape (1, L)."""
        ids = self._tokenizer.encode(text).ids
        return np.asarray([ids], dtype=dtype)
