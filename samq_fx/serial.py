"""Small helpers for the project's files and configs: strict dataclass loading, checked
`torch.load`. One definition of each, so every file and config fails the same clear way."""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path
from typing import Any

import torch

_READ_ERRORS = (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError)


def strict_from_dict(cls, d: dict[str, Any]):
    """`cls(**d)` for a dataclass, rejecting unknown keys with the list of known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)


def load_tensors(path: Path, error: type[Exception], what: str) -> Any:
    """`torch.load(weights_only=True)` on the CPU; an unreadable file raises `error` naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except _READ_ERRORS as err:
        raise error(
            f"{str(path)!r} cannot be read as {what} (truncated or corrupt?): {err}"
        ) from err


class DictConfig:
    """Mixin for frozen config dataclasses: `to_dict` gives JSON-ready values (tuples as
    lists), `from_dict` rejects unknown keys and turns lists back into tuples for tuple fields."""

    def to_dict(self) -> dict:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, d: dict):
        tuple_fields = {f.name for f in dataclasses.fields(cls) if str(f.type).startswith("tuple")}
        d = {k: tuple(v) if k in tuple_fields and isinstance(v, list) else v for k, v in d.items()}
        return strict_from_dict(cls, d)
