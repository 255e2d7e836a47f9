"""Detector pipelines timed end to end: island path vs whole graph, latency, throughput, per-stage profile.

* `throughput`: images/s. A whole graph on OpenVINO runs several infer requests at once
  (`AsyncInferQueue`, PERFORMANCE_HINT=THROUGHPUT, OpenVINO's streams); anything else (the island
  path, with PyTorch between runtime calls) runs calls back to back.
* `profile_whole`: per-stage milliseconds from OpenVINO's own profiler (PERF_COUNT,
  `get_profiling_info`): each region, the decode and the selection (NMS, top-k) inside the graph.
* `profile_islands`: per-stage milliseconds of the island path: each region's compiled model
  (OpenVINO's profiler) and the PyTorch islands (wall time of the call minus the regions, and the NMS).

    >>> import qdet  # doctest: +SKIP
    >>> whole = qdet.lower(qm, "openvino", whole_graph=True)  # doctest: +SKIP
    >>> throughput(whole, x, threads=2).images_per_s  # doctest: +SKIP
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from qdet.bench.latency import torch_threads
from qdet.errors import ConfigError


@dataclass(frozen=True)
class Throughput:
    images_per_s: float
    images: int
    batch: int
    requests: int  # infer requests in flight (1: back-to-back calls)
    streams: int | None  # OpenVINO's streams (None: not OpenVINO async)
    mode: str  # "openvino async" or "sequential"


def _ov_compile(onnx_model: Any, shape: tuple[int, ...], config: dict[str, Any]) -> Any:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(onnx_model.SerializeToString())
    model.reshape({0: ov.PartialShape(list(shape))})
    return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", **config})


def _is_openvino_graph(module: Any) -> bool:
    from qdet.runtimes.openvino import OpenVinoModule

    return isinstance(getattr(module, "compiled", None), OpenVinoModule)


def throughput(module: Callable[[torch.Tensor], Any], x: torch.Tensor, *, threads: int, images: int = 64,
               streams: int | None = None, warmup: int = 2) -> Throughput:
    """Images per second over `images` images (batches of `x`).

    A whole graph on OpenVINO: compiled for throughput (`streams` streams, default OpenVINO's
    choice for `threads` threads) and fed by an `AsyncInferQueue` of its optimal request count;
    each finished request's rows are copied out. Anything else: sequential calls.
    """
    # a list of (3, H, W) images: one graph call each (Faster R-CNN's per-image graph)
    feeds_t = [img.unsqueeze(0) for img in x] if isinstance(x, (list, tuple)) else [x]
    per_call = int(feeds_t[0].shape[0])
    batch = len(x) if isinstance(x, (list, tuple)) else int(x.shape[0])
    rounds = max(1, -(-images // per_call))
    if _is_openvino_graph(module):
        import openvino as ov

        config: dict[str, Any] = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_NUM_THREADS": int(threads)}
        if streams:
            config["NUM_STREAMS"] = int(streams)
        compiled = _ov_compile(module.onnx_model, tuple(feeds_t[0].shape), config)
        jobs = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        n_streams = int(compiled.get_property("NUM_STREAMS"))
        queue = ov.AsyncInferQueue(compiled, jobs)
        outputs: list[np.ndarray] = []
        queue.set_callback(lambda request, _: outputs.append(np.array(request.get_output_tensor(0).data, copy=True)))
        feeds = [{0: np.ascontiguousarray(f.numpy(), dtype=np.float32)} for f in feeds_t]
        if len({tuple(f.shape) for f in feeds_t}) > 1:
            raise ConfigError("throughput: every image of the batch needs the same size (one compiled shape)")
        for i in range(max(warmup, jobs)):
            queue.start_async(feeds[i % len(feeds)])
        queue.wait_all()
        t = time.perf_counter()
        for i in range(rounds):
            queue.start_async(feeds[i % len(feeds)])
        queue.wait_all()
        dt = time.perf_counter() - t
        return Throughput(rounds * per_call / dt, rounds * per_call, batch, jobs, n_streams, "openvino async")
    rounds = max(1, -(-images // batch))
    with torch_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            module(x)
        t = time.perf_counter()
        for _ in range(rounds):
            module(x)
        dt = time.perf_counter() - t
    return Throughput(rounds * batch / dt, rounds * batch, batch, 1, None, "sequential")


# ---------------------------------------------------------------- profiles
def _ov_stages(infos: Any, stage_of: Callable[[str], str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in infos:
        ms = p.real_time.total_seconds() * 1e3
        if ms:
            key = stage_of(p.node_name)
            out[key] = out.get(key, 0.0) + ms
    return out


def stage_of_node(regions: list[str]) -> Callable[[str], str]:
    """An OpenVINO node name (torch.onnx scope names) → its stage: a region; "decode" (the adapter's
    decoder, YOLO/SSD); "selection (NMS, top-k)" (the shared selection); for a per-image graph
    (Faster R-CNN) "float <submodule>" ("float rpn", "float roi_heads", "float transform"); or
    "runtime-inserted" (nodes OpenVINO added, with no scope)."""
    scopes = [(r, f"/{r.replace('.', '/')}/") for r in sorted(regions, key=len, reverse=True)]

    def stage(name: str) -> str:
        for region, scope in scopes:
            if scope in name:
                return f"region {region}"
        parts = name.split("/")  # "/decoder/detector/Mul_3" → ["", "decoder", "detector", "Mul_3"]
        if not name.startswith("/"):
            return "runtime-inserted"
        if len(parts) <= 2:
            return "selection (NMS, top-k)"
        if parts[1] == "decoder":
            return "decode"
        return f"float {parts[2]}" if len(parts) > 3 else f"float {parts[1]}"

    return stage


def profile_whole(whole: nn.Module, x: torch.Tensor, regions: list[str], *, threads: int, repeats: int = 10) -> dict[str, float]:
    """Median per-stage milliseconds of a whole graph on OpenVINO (its profiler), plus "total (wall)"."""
    if not _is_openvino_graph(whole):
        raise ConfigError("--profile reads OpenVINO's profiler: use --runtime openvino")
    x = x[0].unsqueeze(0) if isinstance(x, (list, tuple)) else x  # a per-image graph: its first image
    compiled = _ov_compile(whole.onnx_model, tuple(x.shape), {"PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True,
                                                              "INFERENCE_NUM_THREADS": int(threads)})
    request = compiled.create_infer_request()
    feed = {0: np.ascontiguousarray(x.numpy(), dtype=np.float32)}
    stage = stage_of_node(regions)
    runs: list[dict[str, float]] = []
    walls = []
    for i in range(repeats + 2):
        t = time.perf_counter()
        request.infer(feed)
        wall = (time.perf_counter() - t) * 1e3
        if i >= 2:
            runs.append(_ov_stages(request.get_profiling_info(), stage))
            walls.append(wall)
    return _medians(runs) | {"total (wall)": float(np.median(walls))}


def profile_islands(lowered: nn.Module, x: torch.Tensor, select: Callable[[Any], Any], *, threads: int,
                    repeats: int = 10) -> dict[str, float]:
    """Median per-stage milliseconds of the island path: each OpenVINO region (wall time of its
    call), the PyTorch islands around them, `select` (NMS) and "total (wall)"."""
    from qdet.runtimes.openvino import OpenVinoModule

    regions = {name: m for name, m in lowered.named_modules() if isinstance(m, OpenVinoModule)}
    if not regions:
        raise ConfigError("--profile reads OpenVINO's profiler: use --runtime openvino")
    spent: dict[str, float] = {}
    originals = {}
    for name, m in regions.items():
        originals[name] = m.forward

        def timed(*args: Any, _f: Any = m.forward, _n: str = name) -> Any:
            t = time.perf_counter()
            out = _f(*args)
            spent[_n] = spent.get(_n, 0.0) + (time.perf_counter() - t) * 1e3
            return out

        m.forward = timed  # type: ignore[method-assign]
    runs = []
    try:
        with torch_threads(threads), torch.inference_mode():
            for i in range(repeats + 2):
                spent.clear()
                t0 = time.perf_counter()
                out = lowered(x)
                t1 = time.perf_counter()
                select(out)
                t2 = time.perf_counter()
                if i >= 2:
                    row = {f"region {n} (OpenVINO call)": v for n, v in spent.items()}
                    row["islands (PyTorch: decode, transforms)"] = (t1 - t0) * 1e3 - sum(spent.values())
                    row["selection (PyTorch NMS)"] = (t2 - t1) * 1e3
                    row["total (wall)"] = (t2 - t0) * 1e3
                    runs.append(row)
    finally:
        for name, m in regions.items():
            m.forward = originals[name]  # type: ignore[method-assign]
    return _medians(runs)


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = list(dict.fromkeys(k for r in runs for k in r))
    return {k: float(np.median([r.get(k, 0.0) for r in runs])) for k in keys}
