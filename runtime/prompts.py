"""Prompts files for ``generate --prompts FILE``: many images from one load.

Two formats, told apart by the first non-blank line:

* plain text: one prompt per line (blank lines skipped; a line is taken as it is, trailing
  newline and carriage return removed);
* JSON Lines: every non-blank line a JSON object with ``prompt`` and optionally
  ``negative_prompt`` and ``seed`` (a whole number >= 0; default: the command's ``--seed``).

The file must be UTF-8. Any problem is one :class:`~postdiff.errors.InputError` naming the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from postdiff.errors import InputError, PostdiffError
from postdiff.runtime.jsonio import from_dict


@dataclass(frozen=True)
class PromptJob:
    """One line of a prompts file."""

    prompt: str
    negative_prompt: str = ""
    seed: int | None = None  # None: the command's --seed


def parse_prompts(data: bytes, where: str = "prompts file") -> tuple[PromptJob, ...]:
    """The jobs of a prompts file's bytes (InputError naming the line on any problem)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{where}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    lines = [(number, line.rstrip("\r")) for number, line in enumerate(text.split("\n"), start=1)]
    lines = [(number, line) for number, line in lines if line.strip()]
    if not lines:
        raise InputError(f"{where}: no prompts in it; write one prompt per line, or JSON Lines with a 'prompt' key")
    jsonl = lines[0][1].lstrip().startswith("{")
    jobs = tuple(_json_job(line, f"{where} line {number}") if jsonl else PromptJob(prompt=line)
                 for number, line in lines)
    for (number, _), job in zip(lines, jobs):
        _check(job, f"{where} line {number}")
    return jobs


def load_prompts(path: Path) -> tuple[PromptJob, ...]:
    """Read and parse a prompts file (InputError if it cannot be read or parsed)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"--prompts {path}: cannot be read ({exc.strerror or exc}); check the path") from None
    return parse_prompts(data, f"--prompts {path}")


def _json_job(line: str, where: str) -> PromptJob:
    try:
        value = json.loads(line)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, 4300-digit integers, deep nesting
        raise InputError(f"{where}: not a JSON object ({getattr(exc, 'msg', None) or exc or 'nested too deeply'}); the file is "
                         "JSON Lines because its first line starts with '{', so every line must be one") from None
    try:
        return from_dict(PromptJob, value, where, InputError)
    except PostdiffError:
        raise
    except (TypeError, ValueError) as exc:  # unhashable keys and the like
        raise InputError(f"{where}: not a prompt object ({exc})") from None


def _check(job: PromptJob, where: str) -> None:
    for what, text in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"{where}: {what} {text!r} is not valid Unicode (a lone surrogate)") from None
    if job.seed is not None and job.seed < 0:
        raise InputError(f"{where}: seed {job.seed} is negative; use a whole number >= 0")
