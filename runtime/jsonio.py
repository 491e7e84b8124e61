"""Strict JSON <-> frozen-dataclass conversion and deterministic, atomic JSON writing.

Every configuration file postdiff reads (manifest, schedules, device profiles) goes through
:func:`from_dict`, which rejects unknown and missing keys so that a typo fails loudly instead of
being ignored.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from postdiff.errors import InputError, PostdiffError
from postdiff.files import write_text_atomic

T = TypeVar("T")

# Field metadata key: a field added to a format after files of it exist is left out of the JSON while
# it holds its default, so that files written before it (and their sha256) stay byte for byte the same.
OMIT_DEFAULT = "omit_default"


def from_dict(cls: type[T], data: Any, where: str, error: type[PostdiffError] = InputError) -> T:
    """Build dataclass ``cls`` from a JSON object, recursively and strictly.

    Args:
        cls: a (frozen) dataclass type; fields may be dataclasses, ``tuple[X, ...]``,
            ``dict[str, X]``, ``X | None`` or plain JSON scalars.
        data: the parsed JSON value.
        where: a human-readable location used in error messages (e.g. ``"manifest.json"``).
        error: the exception class to raise.

    Raises:
        error: on a missing or unknown key or a value of the wrong type.
    """
    return _convert(cls, data, where, error)


def _convert(tp: Any, value: Any, where: str, error: type[PostdiffError]) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise error(f"{where}: expected an object, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise error(
                f"{where}: unknown key(s) {unknown}; expected only {sorted(fields)}. "
                "Remove them or check their spelling."
            )
        kwargs = {}
        for name, field in fields.items():
            if name in value:
                kwargs[name] = _convert(hints[name], value[name], f"{where}.{name}", error)
            elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise error(f"{where}: missing required key '{name}'")
        return tp(**kwargs)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        last: PostdiffError | None = None
        for arg in non_none:
            try:
                return _convert(arg, value, where, error)
            except PostdiffError as exc:  # try the next alternative
                last = exc
        raise last if last else error(f"{where}: unexpected value {value!r}")
    if origin is tuple:
        if not isinstance(value, list):
            raise error(f"{where}: expected a list, got {type(value).__name__}")
        item_type = typing.get_args(tp)[0]
        return tuple(_convert(item_type, v, f"{where}[{i}]", error) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise error(f"{where}: expected an object, got {type(value).__name__}")
        value_type = typing.get_args(tp)[1]
        return {k: _convert(value_type, v, f"{where}.{k}", error) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise error(f"{where}: {value} is too large for a number") from None
    if isinstance(tp, type) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise error(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    return value


def to_dict(obj: Any) -> Any:
    """Inverse of :func:`from_dict`: dataclasses to plain JSON values (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not (f.metadata.get(OMIT_DEFAULT) and getattr(obj, f.name) == f.default)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def dumps(data: Any) -> str:
    """Deterministic JSON text: sorted keys, two-space indent, trailing newline."""
    return json.dumps(to_dict(data), indent=2, sort_keys=True) + "\n"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as deterministic JSON to ``path``, atomically (:func:`postdiff.files.atomic_path`)."""
    write_text_atomic(path, dumps(data))


def read_json(path: Path, error: type[PostdiffError] = InputError) -> Any:
    """Parse a JSON file, turning I/O and syntax problems into ``error`` with the path named."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (ValueError, RecursionError) as exc:  # an integer of over 4300 digits, nesting too deep
        raise error(f"{path}: not valid JSON ({str(exc) or 'nested too deeply'})") from None


def load_versioned(cls: type[T], path: Path, version: int, error: type[PostdiffError], fix: str) -> T:
    """Read a JSON file whose ``format_version`` must equal ``version``, then build ``cls`` strictly.

    ``fix`` completes the message for an unsupported version (what the user should do).
    """
    data = read_json(Path(path), error)
    found = data.get("format_version") if isinstance(data, dict) else None
    if found != version:
        raise error(f"{path}: format_version {found!r} is not supported (this postdiff reads version "
                    f"{version}); {fix}")
    return from_dict(cls, data, str(path), error)
