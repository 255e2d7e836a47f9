"""Task results checkpointed to a JSONL file as they arrive, so a restarted driver skips finished tasks.

Each line is `{"ns": namespace, "key": task key, "result": value}`. The namespace says what the
results belong to (model state, metric, job), so a file reused for another model or option set is
not mistaken for this one's results: only lines of the current namespace are read back. A line cut
short by a killed driver is ignored.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "tasks.jsonl"
    >>> Checkpoint(path, "job-1").add("layer:conv1", [1.5, None])
    >>> ck = Checkpoint(path, "job-1")
    >>> "layer:conv1" in ck, ck["layer:conv1"], "layer:conv1" in Checkpoint(path, "job-2")
    (True, [1.5, None], False)
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["Checkpoint", "state_fingerprint"]


class Checkpoint:
    """Results of one namespace in `path` (created on the first `add`)."""

    def __init__(self, path: str | Path, namespace: str) -> None:
        self.path, self.namespace = Path(path), namespace
        self._results: dict[str, Any] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last line of a driver killed while writing
                if isinstance(rec, dict) and rec.get("ns") == namespace and "key" in rec:
                    self._results[rec["key"]] = rec.get("result")
        self.resumed = len(self._results)  # results that were already there when opened

    def __contains__(self, key: str) -> bool:
        return key in self._results

    def __getitem__(self, key: str) -> Any:
        return self._results[key]

    def __len__(self) -> int:
        return len(self._results)

    def add(self, key: str, result: Any) -> None:
        """Record one result: appended and flushed to disk before returning."""
        self._results[key] = result
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"ns": self.namespace, "key": key, "result": result})
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


def state_fingerprint(module: nn.Module, *extra: Any) -> str:
    """A short hash of every parameter/buffer (name, dtype, shape, bytes), every quantizer `enabled`
    flag and `extra` (e.g. the metric's name and images): the namespace of a checkpoint.

    >>> a = state_fingerprint(nn.Linear(2, 2).requires_grad_(False), "top-1")
    >>> len(a)
    16
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in list(module.state_dict().items()):
            if not isinstance(t, torch.Tensor):
                h.update(f"{name}={t!r}".encode())
                continue
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for name, m in module.named_modules():
        if hasattr(m, "enabled"):
            h.update(f"{name}.enabled={bool(m.enabled)}".encode())
    for e in extra:
        h.update(repr(e).encode())
    return h.hexdigest()[:16]
