"""Reading state dicts from disk without executing pickled code, and loading them with readable errors.

`.pt`/`.pth`/`.bin`/`.ckpt` go through `torch.load(weights_only=True)` (tensors and plain containers only);
`.safetensors` through the `safetensors` package. Every failure is a `WeightsError` that names the file.

Example:
    >>> from qdet.models.cifar_resnet import resnet20
    >>> model = resnet20()
    >>> sd = load_state_dict_file("cifar10_resnet20.pt", expected_keys_from=model)  # doctest: +SKIP
    >>> load_into(model, sd, source="cifar10_resnet20.pt", model_name="resnet20")  # doctest: +SKIP
"""
from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qdet.errors import WeightsError

__all__ = ["load_state_dict_file", "load_into", "check_finite", "read_torch_file"]

# Keys under which training scripts commonly nest the state dict, tried in this order.
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
# Prefixes added by DataParallel / Lightning / wrappers, stripped when they explain a key mismatch.
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
# BatchNorm's step counter: absent from many published checkpoints and irrelevant at inference.
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)
_MAX_LISTED = 5


def load_state_dict_file(path: str | Path, *, expected_keys_from: nn.Module | None = None) -> dict[str, Tensor]:
    """Read a state dict from `path`, unwrapping `{"state_dict": ...}` / `{"model": ...}` containers.

    With `expected_keys_from`, wrapper prefixes such as `module.` are stripped when that makes the keys
    match the model's. Raises `WeightsError` (naming the file) when the file is missing, unreadable,
    corrupt, contains pickled objects other than tensors, or holds no state dict.

    Example:
        >>> sd = load_state_dict_file("resnet18.safetensors")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights file '{path}' does not exist")
    if not path.is_file():
        raise WeightsError(f"weights path '{path}' is not a file")
    raw = _read_safetensors(path) if path.suffix.lower() == ".safetensors" else _read_torch(path)
    state = _unwrap(raw, path)
    if expected_keys_from is not None:
        state = _strip_wrapper_prefix(state, set(expected_keys_from.state_dict()))
    return state


def load_into(model: nn.Module, state_dict: Mapping[str, Tensor], *, source: str | Path,
              model_name: str | None = None) -> nn.Module:
    """Copy `state_dict` into `model` (in place, returned for chaining) after checking that it fits.

    Missing or unexpected keys and shape mismatches raise one `WeightsError` naming `source` and up to
    five offending keys, e.g. "weights 'x.pt' do not fit resnet56: 1 shape mismatch, e.g. linear.weight
    (10, 64) in file vs (100, 64) in model". Only `num_batches_tracked` buffers may be absent.

    Example:
        >>> from qdet.models.cifar_resnet import resnet20
        >>> m = load_into(resnet20(), resnet20().state_dict(), source="<memory>")
    """
    name = model_name or type(model).__name__
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith(_OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(v.shape)} in file vs {tuple(expected[k].shape)} in model"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    mistyped = [
        f"{k} is {v.dtype} in file, floating point in model"
        for k, v in state_dict.items()
        if k in expected and expected[k].is_floating_point() and not v.is_floating_point()
    ]
    problems = [
        _describe(mistyped, "dtype mismatch", "dtype mismatches"),
        _describe(mismatched, "shape mismatch", "shape mismatches"),
        _describe(missing, "key missing from the file", "keys missing from the file"),
        _describe(unexpected, "unexpected key in the file", "unexpected keys in the file"),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise WeightsError(f"weights '{source}' do not fit {name}: " + "; ".join(problems))
    check_finite(state_dict, source)  # NaN weights are the file's fault, not the calibration data's
    # strict=False only to tolerate the optional buffers; everything else was checked above.
    model.load_state_dict(dict(state_dict), strict=False)
    return model


def _describe(items: list[str], singular: str, plural: str) -> str:
    if not items:
        return ""
    shown = ", ".join(items[:_MAX_LISTED]) + (", ..." if len(items) > _MAX_LISTED else "")
    return f"{len(items)} {singular if len(items) == 1 else plural}, e.g. {shown}"


def _read_torch(path: Path) -> Any:
    """`torch.load(weights_only=True)`: tensors and plain containers; a pickled object is refused, never run."""
    import re
    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: not the user's business
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses every class and callable; torch's own text advertises weights_only=False,
        # which would run whatever the pickle asks for, so we never repeat it.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise WeightsError(
                f"weights file '{path}' refused: it holds pickled Python objects ({found.group(1)}), not just "
                "tensors, and unpickling them could run arbitrary code, so qdet never does. If it is a whole "
                "model saved with torch.save(model), re-save its weights where you trust the file: "
                "torch.save(model.state_dict(), path), or as .safetensors"
            ) from None
        raise WeightsError(f"weights file '{path}' is corrupt or not a PyTorch state-dict file "
                           "(its pickle data cannot be read without executing code)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError,
            TypeError, AttributeError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise WeightsError(f"weights file '{path}' is corrupt or unreadable ({_first_line(e)})") from None


def check_finite(state: Mapping[str, Tensor], source: str | Path) -> None:
    """WeightsError naming `source` and the first tensor key holding NaN or Inf.

    >>> check_finite({"w": torch.tensor([1.0, float("nan")])}, "x.pt")
    Traceback (most recent call last):
    ...
    qdet.errors.WeightsError: weights file 'x.pt': tensor 'w' contains NaN or Inf (1 of 2 values); the file is damaged or the training diverged
    """
    for key, value in state.items():
        if isinstance(value, Tensor) and value.is_floating_point():
            bad = ~torch.isfinite(value)
            if bool(bad.any()):
                raise WeightsError(f"weights file '{source}': tensor '{key}' contains NaN or Inf "
                                   f"({int(bad.sum())} of {value.numel()} values); the file is damaged or the "
                                   "training diverged")


read_torch_file = _read_torch


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file  # lazy: keep `import qdet` light

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError does not derive from a narrower public base
        raise WeightsError(f"weights file '{path}' is corrupt or not a safetensors file ({_first_line(e)})") from None


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    # Descend through nested containers ({"model": {"state_dict": ...}}) until a tensor mapping appears.
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in _CONTAINER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        kind = "an empty mapping" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise WeightsError(f"weights file '{path}' does not hold a state dict (found {kind})")
    bad = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(
            f"weights file '{path}' does not hold a state dict: {len(bad)} entries are not tensors, "
            f"e.g. {', '.join(bad[:_MAX_LISTED])}"
        )
    return dict(obj)


def _strip_wrapper_prefix(state: dict[str, Tensor], expected: set[str]) -> dict[str, Tensor]:
    if not expected or any(k in expected for k in state):
        return state
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            stripped = {k[len(prefix):]: v for k, v in state.items()}
            if any(k in expected for k in stripped):
                return stripped
    return state


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
