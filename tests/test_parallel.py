"""qdet.parallel: the serial backend (reference), checkpoint/resume, failure reports, and the Ray backend
(a local Ray of 2 one-thread workers, started once for the module) giving the serial results exactly.

All data here is synthetic (random tensors, random labels). The Ray tests skip when `ray` is not
installed (`pip install 'qdet[ray]'`)."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from qdet.analysis import (
    calibration_curve,
    layer_sensitivity,
    mixed_precision_search,
    observer_sweep,
)
from qdet.analysis.task_metric import (
    classification_metric,
    shard_bounds,
    sharded_metric,
)
from qdet.config import Observer, PerChannel, PerTensor, QuantConfig, QuantSpec
from qdet.errors import ConfigError
from qdet.parallel import Checkpoint, SerialBackend, Task, TaskError, state_fingerprint
from qdet.qmodel import quantize

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the serial reference runs 1 thread, like the workers


def _net() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()]
    for _ in range(4):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def _batches(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 12, 12, generator=g) for _ in range(n)]


class NegMse:
    """Higher is better: −MSE of the logits against the float model's on fixed synthetic inputs."""

    name = "-mse"

    def __init__(self, model: nn.Module) -> None:
        self.x = torch.cat(_batches(2, seed=9))
        with torch.no_grad():
            self.ref = model(self.x)

    def __call__(self, m: nn.Module) -> float:
        with torch.no_grad():
            return -float((m(self.x) - self.ref).pow(2).mean())


class FailsOn:
    """A metric that raises (a "model reason") when layer `bad` is the only one quantized, counting calls
    in a file (so calls made in Ray workers are counted too)."""

    def __init__(self, inner: NegMse, bad: str, log: Path) -> None:
        self.inner, self.bad, self.log = inner, bad, log

    def __call__(self, m: nn.Module) -> float:
        from qdet.analysis.points import quant_points

        on = [p.name for p in quant_points(m) if any(q.enabled for q in p.modules)]
        if on == [self.bad]:
            with self.log.open("a") as f:
                f.write("call\n")
            raise ValueError(f"metric blew up on {self.bad}")
        return self.inner(m)


@pytest.fixture(scope="module")
def setup():
    model = _net()
    cfg = QuantConfig(weights=QuantSpec(bits=4, signed=True, symmetric=True, granularity=PerTensor(), narrow_range=True))
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        qm = quantize(model, _batches(3, seed=5), cfg, progress=False)
    return model, qm, NegMse(model)


@pytest.fixture(scope="module")
def ray_backend():
    """One local Ray for the module: 2 CPUs, no dashboard, a small object store."""
    pytest.importorskip("ray")
    import ray.cloudpickle

    from qdet.parallel import RayBackend

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    backend = RayBackend("auto", workers=2, object_store_memory=150 * 1024 * 1024)
    yield backend
    backend.close()


# ------------------------------------------------------------------ serial backend and checkpoint
def _square(offset, x):
    return x * x + offset


def test_serial_map_keeps_task_order_and_rejects_duplicate_keys():
    tasks = [Task(f"x={x}", (x,)) for x in (3, 1, 2)]
    assert SerialBackend().map(_square, 1, tasks, progress=False) == [10, 2, 5]
    with pytest.raises(ConfigError, match="unique"):
        SerialBackend().map(_square, 1, [Task("a", (1,)), Task("a", (2,))], progress=False)


def test_tasks_are_seeded_by_key_not_by_order():
    def draw(_, __):
        return float(torch.rand(1))

    forward = SerialBackend().map(draw, None, [Task("a", (0,)), Task("b", (0,))], progress=False)
    backward = SerialBackend().map(draw, None, [Task("b", (0,)), Task("a", (0,))], progress=False)
    assert forward == backward[::-1] and forward[0] != forward[1]


def test_checkpoint_resume_skips_finished_tasks(tmp_path):
    calls: list[int] = []

    def work(_, x):
        calls.append(x)
        if x == 3:
            raise RuntimeError("driver 'killed' here")
        return x * 10

    path = tmp_path / "tasks.jsonl"
    tasks = [Task(f"x={x}", (x,)) for x in range(5)]
    with pytest.raises(TaskError, match=r"1 of 5 task\(s\) failed; task 'x=3': RuntimeError: driver 'killed' here"):
        SerialBackend().map(work, None, tasks, checkpoint=Checkpoint(path, "ns"), progress=False)
    assert calls == [0, 1, 2, 3, 4] and len(path.read_text().splitlines()) == 4
    with path.open("a") as f:
        f.write('{"ns": "ns", "key": "x=3", "res')  # a line cut short by a killed driver is ignored
    calls.clear()
    ck = Checkpoint(path, "ns")
    assert ck.resumed == 4
    calls_before = len(calls)

    def work_again(_, x):
        calls.append(x)
        return x * 10

    assert SerialBackend().map(work_again, None, tasks, checkpoint=ck, progress=False) == [0, 10, 20, 30, 40]
    assert calls[calls_before:] == [3]  # only the unfinished task ran
    assert Checkpoint(path, "other").resumed == 0  # another namespace sees nothing


def test_state_fingerprint_changes_with_weights_and_quantizer_flags(setup):
    _, qm, _ = setup
    a = state_fingerprint(qm, "m")
    from qdet.analysis.points import quant_points, toggled

    with toggled(qm, [quant_points(qm)[1]], default=True):
        assert state_fingerprint(qm, "m") != a
    assert state_fingerprint(qm, "m") == a and state_fingerprint(qm, "other") != a


def test_sensitivity_resumes_from_checkpoint_without_measuring_again(setup, tmp_path):
    _, qm, metric = setup
    ck = tmp_path / "tasks.jsonl"
    first = layer_sensitivity(qm, metric, _batches(1, seed=3), mode="skip", progress=False,
                              checkpoint=Checkpoint(ck, "run"))

    def must_not_run(_m):
        raise AssertionError("measured again")

    again = layer_sensitivity(qm, must_not_run, _batches(1, seed=3), mode="skip", progress=False,
                              checkpoint=Checkpoint(ck, "run"))
    assert again.as_rows() == first.as_rows() and again.float_metric == first.float_metric


def test_a_failing_task_is_reported_with_its_error_and_the_others_finish(setup, tmp_path):
    _, qm, metric = setup
    log = tmp_path / "calls.log"
    ck = Checkpoint(tmp_path / "tasks.jsonl", "run")
    with pytest.raises(TaskError, match=r"task 'sensitivity/only/both/2': ValueError: metric blew up on 2") as info:
        layer_sensitivity(qm, FailsOn(metric, "2", log), None, mode="only", progress=False, checkpoint=ck)
    assert list(info.value.failures) == ["sensitivity/only/both/2"]
    assert "Traceback" in info.value.details["sensitivity/only/both/2"]
    assert len(ck) == len(quant_points_of(qm)) + 2 - 1  # every other measurement finished and is kept


def quant_points_of(qm):
    from qdet.analysis.points import quant_points

    return quant_points(qm)


def test_ray_options_fail_clearly_without_ray_or_without_a_sweep(monkeypatch, capsys):
    import argparse

    from qdet.cli import main
    from qdet.parallel.cli import backend_from_args

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the qdet[ray] extra were not installed
    with pytest.raises(ConfigError, match=r"--ray needs Ray: pip install 'qdet\[ray\]'"):
        backend_from_args(argparse.Namespace(ray="auto", ray_workers=0), threads=1)
    assert main(["analyze", "resnet20", "--ray", "auto", "--no-progress"]) == 2
    assert "--ray distributes the sensitivity sweep" in capsys.readouterr().err


def test_shard_bounds_cover_every_unit_once():
    for units in range(1, 12):
        for shards in range(1, 6):
            b = shard_bounds(units, shards)
            assert [i for a, z in b for i in range(a, z)] == list(range(units)) and len(b) == min(units, shards)


# ------------------------------------------------------------------ Ray equals serial
def _pinning(_):
    return os.environ.get("QDET_OPENVINO_CPU_PINNING")


def test_ray_backend_runs_tasks_on_one_thread_workers(ray_backend):
    def probe(_, x):
        return [x, torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"), os.getpid()]

    out = ray_backend.map(probe, None, [Task(f"t{i}", (i,)) for i in range(6)], progress=False)
    assert [o[0] for o in out] == list(range(6)) and {o[1] for o in out} == {1} and {o[2] for o in out} == {"1"}
    assert ray_backend.map(_pinning, None, [Task("p")], progress=False) == ["0"]  # OpenVINO threads not pinned
    assert os.getpid() not in {o[3] for o in out}  # ran in worker processes, not here
    assert ray_backend.workers == 2


@pytest.mark.parametrize("mode,metric_top", [("only", None), ("skip", 3)])
def test_ray_sensitivity_equals_serial(setup, ray_backend, mode, metric_top):
    _, qm, metric = setup
    batches = _batches(1, seed=3)
    serial = layer_sensitivity(qm, metric, batches, mode=mode, metric_top=metric_top, progress=False,
                               backend=SerialBackend(threads=1))
    ray = layer_sensitivity(qm, metric, batches, mode=mode, metric_top=metric_top, progress=False, backend=ray_backend)
    assert ray.as_rows() == serial.as_rows()  # bit-for-bit: every metric and SQNR, hence the ranking
    assert (ray.float_metric, ray.int8_metric, ray.int8_output_sqnr_db) == (
        serial.float_metric, serial.int8_metric, serial.int8_output_sqnr_db)
    assert len({(r["metric"], r["output_sqnr_db"]) for r in serial.as_rows()}) >= 4  # a real ranking, not all ties


def test_ray_mixed_precision_search_equals_serial_including_refine(setup, ray_backend):
    _, qm, metric = setup
    sens = layer_sensitivity(qm, metric, None, mode="skip", progress=False, backend=SerialBackend(threads=1))
    bad_order = sens.ranking()[::-1]  # least sensitive first: the greedy keeps layers refine can drop
    int8 = sens.int8_metric
    max_drop = -0.3 * int8  # float metric is 0 (−MSE against itself)
    serial = mixed_precision_search(qm, metric, 0.0, max_drop, bad_order, refine=True, progress=False,
                                    backend=SerialBackend(threads=1))
    ray = mixed_precision_search(qm, metric, 0.0, max_drop, bad_order, refine=True, progress=False, backend=ray_backend)
    assert ray == serial
    assert serial.met and len(serial.steps) > 3  # several waves of 2
    assert any(s.added.startswith("-") for s in serial.steps)  # refine dropped a layer


def test_ray_calibration_studies_equal_serial(setup, ray_backend):
    model, _, metric = setup
    data = torch.cat(_batches(4, seed=11))

    def quantize_fn(n, seed, cfg):
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
        return quantize(model, [data[idx]], cfg, progress=False)

    kw = {"n_images": (2, 8), "seeds": (0, 1), "progress": False}
    serial = calibration_curve(quantize_fn, metric, backend=SerialBackend(threads=1), **kw)
    assert calibration_curve(quantize_fn, metric, backend=ray_backend, **kw) == serial
    assert len({v for p in serial.points for v in p.values}) > 1
    kw = {"observers": (Observer.MINMAX, Observer.HISTOGRAM), "granularities": (PerTensor(), PerChannel(0)),
          "n_images": 8, "seeds": (0,), "progress": False}
    assert observer_sweep(quantize_fn, metric, backend=ray_backend, **kw) == observer_sweep(
        quantize_fn, metric, backend=SerialBackend(threads=1), **kw)


def test_ray_sharded_top1_equals_unsharded(setup, ray_backend):
    model, qm, _ = setup
    g = torch.Generator().manual_seed(4)
    data = [(torch.randn(8, 3, 12, 12, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(5)]
    metric = classification_metric(data)  # synthetic images, random labels
    for m in (model, qm):
        whole = metric(m)
        assert sharded_metric(metric, ray_backend, shards=3)(m) == whole
        assert sharded_metric(metric, SerialBackend(), shards=2)(m) == whole


def test_ray_reports_a_model_error_once_without_retrying(setup, ray_backend, tmp_path):
    _, qm, metric = setup
    log = tmp_path / "calls.log"
    with pytest.raises(TaskError, match=r"task 'sensitivity/only/both/2': ValueError: metric blew up on 2"):
        layer_sensitivity(qm, FailsOn(metric, "2", log), None, mode="only", progress=False, backend=ray_backend)
    assert log.read_text().splitlines() == ["call"]  # raised once: retry_exceptions=False


def test_ray_retries_a_killed_worker(ray_backend, tmp_path):
    marker = tmp_path / "killed-once"

    def dies_first_time(_, x):
        if x == 1 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies mid-task
        return x * 2

    out = ray_backend.map(dies_first_time, None, [Task(f"k{i}", (i,)) for i in range(3)], progress=False)
    assert out == [0, 2, 4] and marker.exists()


def test_ray_checkpoint_resume_equals_a_fresh_serial_run(setup, ray_backend, tmp_path):
    _, qm, metric = setup
    ck = tmp_path / "tasks.jsonl"
    batches = _batches(1, seed=3)
    serial = layer_sensitivity(qm, metric, batches, mode="only", progress=False, backend=SerialBackend(threads=1))
    # a first (Ray) run checkpoints everything; keep only half of it, as if the driver died half-way
    layer_sensitivity(qm, metric, batches, mode="only", progress=False, backend=ray_backend,
                      checkpoint=Checkpoint(ck, "run"))
    lines = ck.read_text().splitlines()
    ck.write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    resumed = Checkpoint(ck, "run")
    serial_lines = resumed.resumed
    again = layer_sensitivity(qm, metric, batches, mode="only", progress=False, backend=ray_backend, checkpoint=resumed)
    assert again.as_rows() == serial.as_rows()
    assert serial_lines == len(lines) // 2 and len(ck.read_text().splitlines()) == len(lines)


@pytest.mark.assets
@pytest.mark.slow
def test_analyze_with_ray_writes_the_serial_json(ray_backend, tmp_path):
    # `qdet analyze --ray auto` (here joining the module's local Ray of 2 workers) writes the JSON the
    # serial run with --threads 1 writes (~15 s CPU per run, most of it the HTML report)
    from conftest import require_asset

    from qdet.cli import main

    require_asset("weights/cifar10_resnet20.pt")
    require_asset("cifar10/test")
    base = ["analyze", "resnet20", "--runtime", "reference", "--calib-images", "32", "--eval-images", "100",
            "--batches", "1", "--batch-size", "8", "--sensitivity", "skip", "--metric-top", "4", "--max-drop", "0.0",
            "--max-float-layers", "3", "--refine", "--threads", "1", "--no-progress", "--no-eval"]
    runs = {}
    for name, extra in (("serial", []), ("ray", ["--ray", "auto"])):
        out = tmp_path / name
        assert main([*base, "--report-dir", str(out), "--json", str(out / "a.json"), *extra]) == 0
        runs[name] = (out / "a.json").read_text()
        assert len((out / "tasks.jsonl").read_text().splitlines()) > 4
    assert runs["ray"] == runs["serial"]
    result = json.loads(runs["ray"])
    assert len([r for r in result["sensitivity"]["rows"] if r["metric"] is not None]) == 4
    assert {r["model"] for r in result["mixed_precision"]["summary"]} == {"float", "int8", "mixed"}


def test_ray_sensitivity_on_a_runtime_equals_serial(setup, ray_backend):
    # --search-runtime: each task exports and runs the toggled model on the runtime, inside the worker
    pytest.importorskip("onnxruntime")
    from qdet.analysis.task_metric import runtime_metric

    model, _, metric = setup
    qm = quantize(model, _batches(3, seed=5), QuantConfig(), progress=False)  # 8-bit: ONNX exports int8 only
    on_ort = runtime_metric(metric, "onnxruntime", threads=1)
    serial = layer_sensitivity(qm, on_ort, None, mode="only", progress=False, backend=SerialBackend(threads=1))
    ray = layer_sensitivity(qm, on_ort, None, mode="only", progress=False, backend=ray_backend)
    assert ray.as_rows() == serial.as_rows() and len({r["metric"] for r in serial.as_rows()}) > 1
