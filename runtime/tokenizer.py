"""Prompt tokenizers: prompts to the id row the text encoder graph takes.

Three kinds, named by the manifest: CLIP-style BPE from a tokenizers-library JSON file, padded and
truncated as the encoder expects; T5 (PixArt-alpha) from such a file too, with the attention mask; and label prompts for class-conditional models (``digits``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from postdiff.errors import BundleError, InputError
from postdiff.runtime.manifest import TokenizerSpec


class PromptTokenizer:
    """Turns a prompt into the fixed-length id row the text encoder graph takes."""

    def __init__(self, spec: TokenizerSpec, bundle: Path) -> None:
        self.spec = spec
        self._tokenizer: Tokenizer | None = None
        if spec.kind in ("bpe", "t5"):
            path = Path(bundle) / spec.file
            try:
                self._tokenizer = Tokenizer.from_file(str(path))
            except Exception as exc:  # the tokenizers library raises plain Exceptions
                raise BundleError(f"{path} is not a readable tokenizer file ({exc}); re-export the bundle") from None
            self._tokenizer.enable_truncation(spec.max_length)
            self._tokenizer.enable_padding(length=spec.max_length, pad_id=spec.pad_id)
        elif spec.kind != "labels":
            raise BundleError(f"tokenizer kind '{spec.kind}' is unknown (expected bpe, t5 or labels); re-export the bundle")

    def encode(self, text: str, dtype: str = "int64") -> np.ndarray:
        """Id row of ``text``: shape (1, max_length)."""
        if self._tokenizer is None:
            return np.asarray([[label_id(text, self.spec.labels)]], dtype=dtype)
        return self.encode_with_mask(text, dtype)[0]

    def encode_with_mask(self, text: str, dtype: str = "int64") -> tuple[np.ndarray, np.ndarray]:
        """(ids, attention mask) of ``text``, each (1, max_length); the mask is 1 on tokens, 0 on padding.
        A ``t5`` tokenizer lower-cases and strips the prompt first, as diffusers' ``PixArtAlphaPipeline``
        does without ``clean_caption`` (its BeautifulSoup/ftfy caption cleaning is not ported)."""
        if self._tokenizer is None:
            ids = np.asarray([[label_id(text, self.spec.labels)]], dtype=dtype)
            return ids, np.ones_like(ids)
        if self.spec.kind == "t5":
            text = text.lower().strip()
        encoding = self._tokenizer.encode(text)
        return np.asarray([encoding.ids], dtype=dtype), np.asarray([encoding.attention_mask], dtype=dtype)


def label_id(prompt: str, labels: tuple[str, ...]) -> int:
    """Id of a label prompt: ``"7"`` or ``"digit 7"`` -> 7; ``""`` -> the null label ``len(labels)``.

    Raises:
        InputError: anything else, listing the valid prompts.
    """
    text = re.sub(r"^(digit|class|label)\s+", "", prompt.strip().lower())
    if text == "":
        return len(labels)
    if text in labels:
        return labels.index(text)
    raise InputError(f"prompt {prompt!r} is not a label of this model; valid prompts: "
                     f"{', '.join(labels)} (optionally as 'digit N'), or empty for the unconditional sample")
