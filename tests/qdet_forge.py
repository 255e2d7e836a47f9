"""Test helper: read a .qdet file, edit its metadata or tensors, write it back (optionally re-signed).

A forged file with a fresh checksum passes the integrity check, so the schema and range checks
behind it are what a test exercises; without re-signing, the checksum must catch the edit.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from qdet.artifact import payload_sha256


def read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def write(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor], *, sign: bool = True) -> Path:
    from safetensors.torch import save_file

    meta = dict(meta)
    if sign:
        meta["sha256"] = payload_sha256(meta, tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def edit(src: Path, dst: Path, *, meta: Callable[[dict[str, Any]], None] | None = None,
         tensors: Callable[[dict[str, torch.Tensor]], None] | None = None, json_field: str | None = None,
         json_edit: Callable[[Any], Any] | None = None, sign: bool = True) -> Path:
    """Copy `src` to `dst` with edits: `meta(raw)` / `tensors(dict)` in place, or `json_edit` on one JSON field."""
    raw, ts = read(src)
    if json_field is not None and json_edit is not None:
        value = json.loads(raw[json_field])
        new = json_edit(value)
        raw[json_field] = json.dumps(value if new is None else new)
    if meta is not None:
        meta(raw)
    if tensors is not None:
        tensors(ts)
    return write(dst, raw, ts, sign=sign)
