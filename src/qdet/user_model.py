"""Bring your own model: `--model-file file.py:build`, `model.pt2` (torch.export), `model.onnx`, and their checks.

A `.py` file is imported from its path (never by module name) and `build()` is called without
arguments; it must return an `nn.Module`. A `.pt2` file is a `torch.export` ExportedProgram
(`torch.export.save`); its ATen graph is turned back into ordinary modules (conv, linear and
batch-norm on the program's own parameters become nn.Conv2d / nn.Linear / nn.BatchNorm2d, a few
ATen ops their torch functions) so that the generic path folds and quantizes it like eager code.
An `.onnx` file is converted by onnx2torch (the `onnx` extra) into an fx graph of ordinary modules
(Conv → nn.Conv2d, Gemm → nn.Linear, ...); the exporter's aliases of shared weights (Identity nodes
on initializers, which onnx2torch cannot read) are resolved first. Exporters fold BatchNorm into the
conv, so such a model arrives with no BatchNorm to fold.

Every failure is a `ModelError` naming the file, the function and what went wrong, in one line.

    >>> spec = parse_model_file("nets/my_model.py:build")
    >>> spec.path.name, spec.function, spec.kind.value, spec.run_name
    ('my_model.py', 'build', 'python', 'my_model_build')
"""
from __future__ import annotations

import ast
import contextlib
import importlib.util
import operator
import sys
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F
from torch.utils import _pytree as pytree

from qdet.errors import ModelError


class ModelKind(Enum):
    """What a `--model-file` holds."""

    PYTHON = "python"  # FILE.py:FUNCTION
    EXPORTED = "exported"  # a torch.export program (.pt2)
    ONNX = "onnx"


_KINDS = {".py": ModelKind.PYTHON, ".pt2": ModelKind.EXPORTED, ".onnx": ModelKind.ONNX}


@dataclass(frozen=True)
class ModelFile:
    """A parsed `--model-file` argument: the file, the builder function (.py only) and its kind."""

    path: Path
    function: str | None
    kind: ModelKind

    @property
    def label(self) -> str:
        """How errors and tables name it: `file.py:build` or `model.pt2`."""
        return f"{self.path}:{self.function}" if self.function else str(self.path)

    @property
    def run_name(self) -> str:
        """The default run name: `<stem>_<function>` (or `<stem>`), for runs/<name>.qdet."""
        return f"{self.path.stem}_{self.function}" if self.function else self.path.stem


def parse_model_file(spec: str) -> ModelFile:
    """`file.py:FUNCTION`, `model.pt2` or `model.onnx` → ModelFile (the file is not opened yet)."""
    text = spec.strip()
    head, sep, tail = text.rpartition(":")
    if sep and head.lower().endswith(".py"):
        path, function = Path(head), tail.strip()
        if not function.isidentifier():
            raise ModelError(f"--model-file {text!r}: {function!r} is not a function name "
                             f"(expected FILE.py:FUNCTION, e.g. my_model.py:build)")
    else:
        path, function = Path(text), None
    kind = _KINDS.get(path.suffix.lower())
    if kind is None:
        raise ModelError(f"--model-file {text!r}: expected FILE.py:FUNCTION (a function returning an nn.Module), "
                         f"a torch.export program (.pt2) or an ONNX file (.onnx)")
    if kind is ModelKind.PYTHON and function is None:
        raise ModelError(f"--model-file {text!r}: name the function that builds the model, "
                         f"as {path}:FUNCTION{_defined_functions_hint(path)}")
    return ModelFile(path, function, kind)


def _defined_functions_hint(path: Path) -> str:
    """' (functions defined there: a, b)' read with `ast` (nothing is executed), or ''."""
    names = _defined_functions(path)
    return f" (functions defined there: {', '.join(names[:8])})" if names else ""


def _defined_functions(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return []
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and not n.name.startswith("_")]


def load_model(spec: ModelFile) -> nn.Module:
    """Build the float model `spec` names, in eval mode."""
    _check_file(spec.path)
    if spec.kind is ModelKind.PYTHON:
        model = _build_from_python(spec)
    elif spec.kind is ModelKind.EXPORTED:
        model = exported_to_module(_load_exported(spec))
    else:
        model = onnx_to_module(_load_onnx(spec), spec)
    return model.eval()


def model_input_shape(spec: ModelFile) -> tuple[int | None, tuple[int, ...]] | None:
    """(batch or None when dynamic, per-sample shape) that a .pt2 or .onnx file was exported for;
    None for Python builders, several inputs, or a dynamic spatial size (then --input-size decides)."""
    if spec.kind is ModelKind.EXPORTED:
        return exported_input_shape(spec)
    if spec.kind is ModelKind.ONNX:
        return onnx_input_shape(_load_onnx(spec))
    return None


def _describe(exc: BaseException, path: Path) -> str:
    """`TypeError: message (line 12)`, the line being the last frame inside `path`."""
    message = " ".join(str(exc.msg if isinstance(exc, SyntaxError) else exc).split())
    line = getattr(exc, "lineno", None) if isinstance(exc, SyntaxError) else None
    if line is None:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path.resolve()]
        line = frames[-1].lineno if frames else None
    where = f" (line {line})" if line else ""
    return f"{type(exc).__name__}: {message[:300]}{where}"


@contextlib.contextmanager
def _file_dir_on_path(path: Path) -> Iterator[None]:
    """The file's folder first on sys.path while it is imported and built (sibling imports work)."""
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)


def import_file(path: Path, option: str = "--model-file") -> Any:
    """Import a Python file from its path under a private module name; errors name the file."""
    name = f"_qdet_user_{abs(hash(str(path.resolve())))}_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ModelError(f"{option} {str(path)!r}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        with _file_dir_on_path(path):
            module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 -- the user's code: any exception is theirs, one line
        sys.modules.pop(name, None)
        raise ModelError(f"{option} {str(path)!r}: importing the file raised {_describe(exc, path)}") from None
    return module


def load_function(path: Path, function: str, option: str = "--model-file") -> Any:
    """The callable `function` defined in the Python file at `path`."""
    if not path.is_file():
        raise ModelError(f"{option} {str(path)!r}: not found")
    module = import_file(path, option)
    fn = getattr(module, function, None)
    if fn is None:
        names = _defined_functions(path)
        hint = f"; functions defined there: {', '.join(names[:8])}" if names else ""
        raise ModelError(f"{option} '{path}:{function}': no function {function!r} in the file{hint}")
    if not callable(fn):
        raise ModelError(f"{option} '{path}:{function}': {function!r} is not a function (it is {type(fn).__name__})")
    return fn


def _build_from_python(spec: ModelFile) -> nn.Module:
    assert spec.function is not None
    build = load_function(spec.path, spec.function)
    try:
        with _file_dir_on_path(spec.path):
            model = build()
    except (Exception, SystemExit) as exc:  # noqa: BLE001 -- the user's function
        raise ModelError(f"--model-file {spec.label!r}: {spec.function}() raised {_describe(exc, spec.path)}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"--model-file {spec.label!r}: {spec.function}() returned {type(model).__name__}, "
                         f"not a torch.nn.Module")
    return model


# ---------------------------------------------------------------- torch.export programs (.pt2)

def _check_file(path: Path) -> None:
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise ModelError(f"--model-file {str(path)!r}: {what}")


def _load_exported(spec: ModelFile) -> Any:
    import logging
    import zipfile

    _check_file(spec.path)
    if not zipfile.is_zipfile(spec.path):
        raise ModelError(f"--model-file {str(spec.path)!r}: not a torch.export program (a .pt2 file is a zip "
                         f"archive written by torch.export.save)")
    log = logging.getLogger("torch.export")
    level = log.level
    log.setLevel(logging.ERROR)  # torch logs a traceback before raising on a bad archive
    try:
        return torch.export.load(str(spec.path))
    except Exception as exc:  # noqa: BLE001 -- torch raises many kinds
        raise ModelError(f"--model-file {str(spec.path)!r}: not a torch.export program that torch.export.load can "
                         f"read ({_describe(exc, spec.path)})") from None
    finally:
        log.setLevel(level)


def exported_input_shape(spec: ModelFile) -> tuple[int | None, tuple[int, ...]] | None:
    """(batch or None when dynamic, per-sample shape) of a single-input exported program, else None."""
    ep = _load_exported(spec)
    users = list(ep.graph_signature.user_inputs)
    vals = [n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder" and n.name in users]
    if len(vals) != 1 or not isinstance(vals[0], torch.Tensor) or vals[0].dim() < 1:
        return None
    dims = list(vals[0].shape)
    rest = tuple(d if isinstance(d, int) else -1 for d in dims[1:])
    if any(d < 0 for d in rest):
        return None  # dynamic spatial size: the user passes --input-size
    return (dims[0] if isinstance(dims[0], int) else None), rest


# ---------------------------------------------------------------- ONNX files (.onnx)

def _load_onnx(spec: ModelFile) -> Any:
    _check_file(spec.path)
    try:
        import onnx
    except ImportError:
        raise ModelError(f"--model-file {str(spec.path)!r}: ONNX input needs the onnx extra "
                         f"(pip install 'qdet[onnx]')") from None
    try:
        return onnx.load(str(spec.path))
    except Exception as exc:  # noqa: BLE001 -- protobuf raises several kinds on a bad file
        raise ModelError(f"--model-file {str(spec.path)!r}: not an ONNX model that onnx can read "
                         f"({type(exc).__name__})") from None


def onnx_input_shape(proto: Any) -> tuple[int | None, tuple[int, ...]] | None:
    """(batch or None when symbolic, per-sample shape) of an ONNX model's single non-weight input."""
    weights = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in weights]
    if len(inputs) != 1:
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) < 2 or any(d is None for d in dims[1:]):
        return None
    return dims[0], tuple(int(d) for d in dims[1:])  # type: ignore[arg-type]


def _inline_weight_aliases(proto: Any) -> None:
    """Point every consumer of `Identity(initializer)` at the initializer itself, in place.

    torch.onnx.export deduplicates equal weights (BN-folded biases, say) into one initializer plus
    Identity nodes; onnx2torch looks conv weights up among the initializers only."""
    weights = {i.name for i in proto.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "Identity" and n.input[0] in weights}
    if not alias:
        return
    kept = [n for n in proto.graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    for out in proto.graph.output:
        if out.name in alias:  # a graph output that is a weight itself: keep its Identity
            kept.append(next(n for n in proto.graph.node if n.output[0] == out.name))
    del proto.graph.node[:]
    proto.graph.node.extend(kept)


def onnx_to_module(proto: Any, spec: ModelFile) -> nn.Module:
    """An ONNX model as an fx.GraphModule of torch modules (onnx2torch), ready for the generic path."""
    try:
        import onnx2torch
    except ImportError:
        raise ModelError(f"--model-file {str(spec.path)!r}: ONNX input needs onnx2torch "
                         f"(pip install 'qdet[onnx]')") from None
    _inline_weight_aliases(proto)
    # onnx2torch's Slice indexes with a list on every call; torch warns each time that this form is
    # deprecated (the result is still right: the float rows match the original model). Once is enough.
    warnings.filterwarnings("once", message="Using a non-tuple sequence for multidimensional indexing",
                            module="onnx2torch")
    try:
        return onnx2torch.convert(proto)
    except NotImplementedError as exc:  # onnx2torch: no converter for an op type / version
        raise ModelError(f"--model-file {str(spec.path)!r}: onnx2torch cannot convert it: {' '.join(str(exc).split())[:300]}") from None
    except Exception as exc:  # noqa: BLE001 -- malformed graphs raise anything
        raise ModelError(f"--model-file {str(spec.path)!r}: onnx2torch failed: {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:300]}") from None


# ATen ops whose torch function takes the same positional arguments (the rest stay ATen calls).
_ATEN_TO_TORCH: dict[Any, Any] = {}


def _aten_table() -> dict[Any, Any]:
    if not _ATEN_TO_TORCH:
        aten = torch.ops.aten
        _ATEN_TO_TORCH.update({
            aten.relu.default: torch.relu, aten.relu_.default: torch.relu,
            aten.hardtanh.default: F.hardtanh, aten.hardtanh_.default: F.hardtanh,
            aten.hardswish.default: F.hardswish, aten.hardswish_.default: F.hardswish,
            aten.hardsigmoid.default: F.hardsigmoid, aten.silu.default: F.silu, aten.silu_.default: F.silu,
            aten.sigmoid.default: torch.sigmoid, aten.gelu.default: F.gelu,
            aten.leaky_relu.default: F.leaky_relu, aten.leaky_relu_.default: F.leaky_relu,
            aten.add.Tensor: torch.add, aten.add_.Tensor: torch.add, aten.mul.Tensor: torch.mul,
            aten.cat.default: torch.cat, aten.flatten.using_ints: torch.flatten,
            aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d, aten.max_pool2d.default: F.max_pool2d,
            aten.avg_pool2d.default: F.avg_pool2d, aten.mean.dim: torch.mean,
            aten.view.default: torch.reshape, aten.reshape.default: torch.reshape,
        })
    return _ATEN_TO_TORCH


def exported_to_module(ep: Any) -> nn.Module:
    """An ExportedProgram's `.module()` with its ATen conv/linear/batch-norm calls on its own
    parameters turned into nn.Conv2d / nn.Linear / nn.BatchNorm2d (named like the original layers)
    and common ATen ops into their torch functions; the guard on the exported input shape is
    dropped (callers feed the exported shape)."""
    gm = ep.module()
    aten = torch.ops.aten
    table = _aten_table()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards_fn") and not node.users:
            gm.graph.erase_node(node)
        elif node.op == "call_function" and node.target in (aten.conv2d.default, aten.linear.default,
                                                             aten.batch_norm.default):
            _modularize(gm, node)
        elif node.op == "call_function" and node.target in table:
            node.target = table[node.target]
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in gm.named_parameters(recurse=False)] + [n for n, _ in gm.named_buffers(recurse=False)]:
        if name not in used:
            delattr(gm, name)  # a root-level tensor now held by the module made from it
    # a plain GraphModule of the same graph: `.module()`'s own refuses eval()/train()
    plain = fx.GraphModule(gm, gm.graph, class_name=type(gm).__name__)
    plain.recompile()
    return plain


def _attr_tensor(gm: fx.GraphModule, node: Any) -> tuple[str, torch.Tensor] | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    target = str(node.target)
    try:
        return target, operator.attrgetter(target)(gm)
    except AttributeError:
        return None


def _modularize(gm: fx.GraphModule, node: fx.Node) -> None:
    """Replace one ATen conv2d / linear / batch_norm call on get_attr operands by a module call."""
    aten = torch.ops.aten
    if node.kwargs:
        return  # export writes these calls positionally; anything else is left as it is
    args = list(node.args)
    tensors = [_attr_tensor(gm, a) for a in args[1:]] if node.target is not aten.batch_norm.default else \
        [_attr_tensor(gm, a) for a in args[1:5]]
    if tensors[0] is None or any(a is not None and isinstance(a, fx.Node) and t is None
                                 for a, t in zip(args[1:], tensors)):
        return  # computed operands: left as they are (the coverage report lists them)
    owners = {t[0].rpartition(".")[0] for t in tensors if t is not None}
    if len(owners) != 1:
        return
    owner = owners.pop()
    weight = tensors[0][1]
    module: nn.Module
    if node.target is aten.conv2d.default:
        if weight.dim() != 4:
            return
        stride, padding, dilation, groups = (args[3:7] + [1, 0, 1, 1][len(args[3:7]):])
        if isinstance(padding, str):
            return
        module = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride, padding,
                           dilation, groups, bias=len(tensors) > 1 and tensors[1] is not None)
    elif node.target is aten.linear.default:
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=len(tensors) > 1 and tensors[1] is not None)
    else:
        # batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)
        if len(args) < 8 or args[5] or any(t is None for t in tensors[2:4]):
            return
        module = nn.BatchNorm2d(weight.shape[0], eps=float(args[7]), momentum=float(args[6]),
                                affine=tensors[0] is not None)
        module.running_mean, module.running_var = tensors[2][1], tensors[3][1]
        module.weight = _as_param(tensors[0][1])
        module.bias = _as_param(tensors[1][1]) if tensors[1] is not None else None
        _install(gm, node, owner, module.eval())
        return
    module.weight = _as_param(weight)
    if len(tensors) > 1 and tensors[1] is not None:
        module.bias = _as_param(tensors[1][1])
    _install(gm, node, owner, module)


def _exists(gm: fx.GraphModule, path: str) -> bool:
    try:
        operator.attrgetter(path)(gm)
    except AttributeError:
        return False
    return True


def _as_param(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)


def _install(gm: fx.GraphModule, node: fx.Node, owner: str, module: nn.Module) -> None:
    """Put `module` at the owner's path (a container of exactly its tensors) or a fresh one, and call it."""
    own = {n for n, _ in module.named_parameters(recurse=False)} | {n for n, _ in module.named_buffers(recurse=False)}
    name = owner
    if owner:
        current = gm.get_submodule(owner)
        held = {n for n, _ in current.named_parameters(recurse=False)} | {n for n, _ in current.named_buffers(recurse=False)}
        if any(True for _ in current.children()) or not held <= own:
            name = ""  # the container holds more than this layer: keep it, add the layer beside it
    if not name:
        base = f"{owner}_{node.name}" if owner else node.name
        name, i = base, 1
        while _exists(gm, name):
            name, i = f"{base}_{i}", i + 1
    parent, _, leaf = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (node.args[0],))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


# ---------------------------------------------------------------- probing the model

def check_outputs(model: nn.Module, x: Any, label: str) -> Any:
    """Run the float model once on `x`; its output must contain a floating-point tensor."""
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # noqa: BLE001 -- the user's forward
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ModelError(f"--model-file {label!r}: the model raised {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:240]} on an input of shape {shape} "
                         f"(check --input-size and --preprocess)") from None
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise ModelError(f"--model-file {label!r}: the model returned {type(out).__name__}, nothing tensor-like; "
                         f"qdet needs a float tensor output (or a tuple/list/dict of them)")
    return out
