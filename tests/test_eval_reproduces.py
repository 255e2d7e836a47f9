"""`qdet eval --qmodel F` reproduces what `qdet quantize` measured and stored in F (issue 21).

The cause of 93.47 (quantize) vs 93.45 (eval) on ResNet56/OpenVINO: the ONNX exporter rounded the
in-memory float weights in float64 while the `.qdet` file stores codes rounded in float32 (as the
simulation does): 3 of 848,944 codes differed, so the model `quantize` timed and evaluated was not
the one it saved. Now every runtime and the file use `quantizer.weight_codes`. And eval's
"float (<runtime>)" row is the float model, not the loaded int8 weights with quantizers off.
"""
import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import require_asset
from qdet import api
from qdet.quant.quantizer import QuantConv2d, weight_codes


def _near_ties(scale: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """float32 values within an ulp of (k + 0.5) * scale, per output channel (axis 0): where float32
    and float64 division round x / scale to different codes."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(-100, 100, (scale.numel(), n), generator=g).to(torch.float64)
    x = ((k + 0.5) * scale.to(torch.float64).reshape(-1, 1)).to(torch.float32).numpy()
    step = torch.randint(-2, 3, x.shape, generator=g).numpy()
    for _ in range(2):  # move up to 2 ulps either way
        x = np.where(step > 0, np.nextafter(x, np.float32(np.inf)), np.where(step < 0, np.nextafter(x, np.float32(-np.inf)), x))
        step = step - np.sign(step)
    return torch.from_numpy(x.astype(np.float32))


def test_the_onnx_exporter_stores_the_artefact_codes():
    """The exporter's QuantizeLinear folding gives exactly `weight_codes` (float64 x / s), also on
    values that sit on a rounding tie, where dividing in float32 picks the other code."""
    from qdet.runtimes.onnx_export import _quantize_np

    scale = torch.rand(16, generator=torch.Generator().manual_seed(1)) * 0.01 + 1e-4
    w = _near_ties(scale, 4096).reshape(16, 4096)
    q = type("Q", (), {})()
    q.scale, q.zero_point = scale, torch.zeros(16, dtype=torch.int32)
    q.spec = type("S", (), {"qmin": -127, "qmax": 127, "axis": 0})()
    ours = weight_codes(w, q).numpy()
    onnx = _quantize_np(w.numpy(), scale.numpy(), np.zeros(16, np.int8), 0, np.int8)
    assert np.array_equal(ours, onnx.astype(np.int32))
    in32 = torch.round(w / scale[:, None]).numpy()
    assert (in32 != ours).any(), "the test values must include ties that float32 rounds differently"


def test_a_loaded_model_runs_exactly_what_quantize_ran(tmp_path):
    """In-memory vs saved-and-loaded, lowered to onnxruntime: bit-identical outputs, even with
    weights on rounding ties."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()
    batches = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    qm = api.quantize(net, batches, progress=False)
    for mod in qm.modules():
        if isinstance(mod, QuantConv2d):
            w = _near_ties(mod.weight_quant.scale, mod.weight[0].numel()).reshape(mod.weight.shape)
            mod.weight.data.copy_(w.clamp(-126 * mod.weight_quant.scale.reshape(-1, 1, 1, 1),
                                          126 * mod.weight_quant.scale.reshape(-1, 1, 1, 1)))
    path = api.save(qm, tmp_path / "m.qdet")
    loaded = api.load(path, nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(qm(x), loaded(x))  # the simulation
        assert torch.equal(api.lower(qm, "onnxruntime")(x), api.lower(loaded, "onnxruntime")(x))


def test_float_row_is_the_float_model_not_the_loaded_int8_weights(tmp_path):
    """`lower_float` of a loaded model runs the float model's own weights (BN-folded graph)."""
    pytest.importorskip("onnxruntime")
    from qdet.jobs import lower_float

    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))  # noqa: E731
    net = make().eval()
    net(torch.randn(1, 3, 8, 8))
    for p in net.parameters():
        p.data.normal_()
    qm = api.quantize(net, [torch.randn(4, 3, 8, 8) for _ in range(2)], progress=False)
    skeleton = make().eval()
    skeleton(torch.randn(1, 3, 8, 8))
    loaded = api.load(api.save(qm, tmp_path / "m.qdet"), skeleton)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        floated = lower_float(None, net, loaded, "onnxruntime")(x)
        torch.testing.assert_close(floated, net(x), rtol=1e-4, atol=1e-4)
        int8_weights_float = api.lower(loaded, "onnxruntime", quantized=False)(x)
        assert not torch.allclose(int8_weights_float, net(x), rtol=1e-4, atol=1e-4)  # what eval used to print


@pytest.mark.assets
def test_eval_qmodel_reproduces_quantize(tmp_path, capsys):
    """`qdet quantize` then `qdet eval --qmodel` on the same images, runtime and seed: the same int8
    top-1, the same float rows, and eval says so."""
    from qdet.artifact import read_metadata
    from qdet.cli import main

    require_asset("weights/cifar10_resnet20.pt")
    require_asset("cifar10/test")
    out, qjs, ejs = tmp_path / "r20.qdet", tmp_path / "q.json", tmp_path / "e.json"
    common = ["--eval-images", "200", "--no-progress", "--threads", "2"]
    assert main(["quantize", "resnet20", "--calib-images", "64", "--no-bench", "--out", str(out),
                 "--json", str(qjs), *common]) == 0
    assert main(["eval", "resnet20", "--qmodel", str(out), "--json", str(ejs), *common]) == 0
    printed = capsys.readouterr().out
    quantized, evaluated = json.loads(qjs.read_text()), json.loads(ejs.read_text())
    rt = quantized["meta"]["runtime"]
    assert evaluated["meta"]["runtime"] == rt and evaluated["meta"]["eval_images"] == 200
    q_rows = {r["model"]: r for r in quantized["rows"]}
    e_rows = {r["model"]: r for r in evaluated["rows"]}
    stored = {r["model"]: r for r in read_metadata(out)["metrics"]["rows"]}
    assert e_rows[f"int8 ({rt})"]["top1"] == q_rows[f"int8 ({rt})"]["top1"] == stored[f"int8 ({rt})"]["top1"]
    for label in ("float (PyTorch eager)", f"float ({rt})"):
        assert e_rows[label]["top1"] == q_rows[label]["top1"], label
    assert "reproduced" in printed and "latency_ms" not in printed  # untimed: no empty latency columns


def test_analysis_of_a_loaded_file_runs_on_the_float_weights(tmp_path):
    """analyze --qmodel: quantizers off must give the float model — with --qmodel the sensitivity's
    "float" used to be the file's int8 weights with quantizers off, a second float number beside the
    table's (issue 21); int8 stays the file's model; other float weights are refused."""
    from qdet.errors import ConfigError
    from qdet.qmodel import with_float_weights
    from qdet.quant.calibrate import quantization_disabled

    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()  # noqa: E731
    net = make()
    for p in net.parameters():
        p.data.normal_()
    qm = api.quantize(net, [torch.randn(4, 3, 8, 8) for _ in range(2)], progress=False)
    loaded = api.load(api.save(qm, tmp_path / "m.qdet"), make())
    analysed = with_float_weights(loaded, net)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(analysed(x), loaded(x))  # the same int8 model
        with quantization_disabled(analysed):
            torch.testing.assert_close(analysed(x), net(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="not made from these float weights"):
        with_float_weights(loaded, make())
