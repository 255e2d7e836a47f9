"""`--ray auto|ADDRESS` and `--ray-workers N` for the commands whose analyses fan out.

    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> add_ray_options(p)
    >>> backend_from_args(p.parse_args([]), threads=1)
    SerialBackend(workers=1, threads=1)
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qdet.errors import ConfigError
from qdet.parallel.backend import Backend, SerialBackend
from qdet.parallel.checkpoint import Checkpoint, state_fingerprint

__all__ = ["add_ray_options", "backend_from_args", "check_ray_options", "open_checkpoint"]


def add_ray_options(p: argparse.ArgumentParser, *, evaluation: bool = False) -> None:
    """`--ray`, `--ray-workers` (and `--no-resume` for checkpointed sweeps); `evaluation=True`: the
    help of commands whose evaluation is what Ray distributes (`qdet eval`, `qdet quantize`)."""
    what = ("evaluate float and int8 as image shards on Ray (detections merged and scored once)" if evaluation else
            "run the sensitivity / mixed-precision measurements as Ray tasks")
    p.add_argument("--ray", metavar="auto|ADDRESS",
                   help=f"{what}: 'auto' starts a local Ray (one 1-thread worker per core, or --ray-workers), an "
                        "address (HOST:PORT, ray://...) joins that cluster; results equal the serial run with "
                        "--threads 1 (needs qdet[ray])")
    p.add_argument("--ray-workers", type=int, default=0, metavar="N",
                   help="with --ray auto: worker processes of the local Ray (default: the number of cores)")
    if not evaluation:
        p.add_argument("--no-resume", action="store_true",
                       help="measure everything again instead of reusing the measurements checkpointed in the report "
                            "folder's tasks.jsonl by an earlier (or interrupted) run with the same model and options")


def check_ray_options(args: argparse.Namespace) -> None:
    """ConfigError for a `--ray` request that cannot work (Ray missing, --ray-workers misused), before any work."""
    if not getattr(args, "ray", None):
        if getattr(args, "ray_workers", 0):
            raise ConfigError("--ray-workers: only with --ray auto")
        return
    if args.ray_workers < 0 or (args.ray_workers and args.ray != "auto"):
        raise ConfigError("--ray-workers: a positive number, and only with --ray auto (a cluster has its own CPUs)")
    from qdet.parallel.ray_backend import require_ray

    require_ray()


def backend_from_args(args: argparse.Namespace, *, threads: int | None) -> Backend:
    """The backend `--ray` asks for: serial in this process with `threads` torch threads when absent."""
    check_ray_options(args)
    if not getattr(args, "ray", None):
        return SerialBackend(threads=threads)
    from qdet.parallel.ray_backend import RayBackend

    return RayBackend(args.ray, workers=args.ray_workers)


def open_checkpoint(args: argparse.Namespace, path: Path, qmodel: Any, *what: Any) -> Checkpoint:
    """The checkpoint of this run's measurements: namespaced by the quantized model's state, the
    measurement (`what`: metric, images, ...) and the options that change the numbers, so a run with
    another model or options never reuses them. `--no-resume` starts the file afresh."""
    from qdet import __version__

    if getattr(args, "no_resume", False) and path.exists():
        path.unlink()
    options = {k: getattr(args, k, None) for k in ("model", "weights", "data", "seed", "eval_images", "batches",
                                                   "batch_size", "metric", "metric_top", "search_on",
                                                   "search_runtime", "sensitivity")}
    backend = next((w for w in what if isinstance(w, Backend)), None)
    if backend is not None:  # the thread count changes float sums: part of what is measured
        what = tuple(w for w in what if w is not backend) + (f"threads={backend.threads}",)
    ck = Checkpoint(path, state_fingerprint(qmodel, __version__, sorted(options.items()), *what))
    if ck.resumed:
        print(f"resuming: {ck.resumed} measurement(s) already in {path} (--no-resume to measure again)")
    return ck
