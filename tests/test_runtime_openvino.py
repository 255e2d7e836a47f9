"""OpenVINO lowering: registered, runs int8 kernels, agrees with the reference simulation and onnxruntime."""
import pytest
import torch
import torchvision

from qdet.api import lower
from qdet.config import QuantConfig
from qdet.qmodel import quantize
from qdet.quant.calibrate import quantization_disabled
from qdet.runtimes.base import get_runtime, runtime_names

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")


def _batches(n=3, size=32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, size, size, generator=g) for _ in range(n)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """PyTorch's spinning worker threads slow small models 10× when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def qm():
    torch.manual_seed(0)
    return quantize(torchvision.models.resnet18(num_classes=10).eval(), _batches(), QuantConfig(), progress=False)


@pytest.fixture(scope="module")
def ov(qm):
    return lower(qm, "openvino", threads=1)


def test_openvino_is_a_registered_runtime():
    assert "openvino" in runtime_names()
    assert get_runtime("openvino", threads=2).threads == 2


def test_convolutions_run_in_int8(ov):
    ops = ov.executed_ops()
    int8_convs = sum(n for k, n in ops.items() if k.startswith("Convolution/") and k.split("/")[1] in ("u8", "i8"))
    assert int8_convs >= 20, ops  # every conv of ResNet18 (BN folded) runs on int8 data


def test_agrees_with_reference_and_onnxruntime(qm, ov):
    ort = lower(qm, "onnxruntime", threads=1)
    x = torch.cat(_batches(2))
    with torch.no_grad():
        ref, a, b = qm(x), ov(x), ort(x)
    step = float(qm.model.get_submodule(qm.layers[-1].quantizer).scale)
    # OpenVINO fuses requantization differently from the simulation (and from onnxruntime): a few
    # output steps apart after 20 layers, on logits spanning ~200 steps
    assert float((ref - a).abs().max()) <= 8 * step
    assert float((a - b).abs().max()) <= 8 * step
    # the argmax may differ only where the simulation's top-2 margin is within that error (random
    # weights give near-ties: one of these 8 images has its top two logits a few steps apart)
    top2 = ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * float((ref - a).abs().max())
    assert bool(clear.any()) and bool((ref.argmax(1) == a.argmax(1))[clear].all())


def test_float_lowering_matches_pytorch(qm):
    rt = lower(qm, "openvino", quantized=False, threads=1)
    x = torch.cat(_batches(1))
    with torch.no_grad(), quantization_disabled(qm):  # the BN-folded float graph
        assert torch.allclose(rt(x), qm(x), atol=1e-3)


def test_input_size_and_batch_may_change(ov):
    rt = ov
    with torch.no_grad():
        assert rt(torch.randn(3, 3, 48, 40)).shape == (3, 10)
        assert rt(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_static_compilations_are_bounded(qm):
    rt = lower(qm, "openvino", threads=1)
    sizes = [32, 40, 48, 56, 64, 72]
    x = {s: torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(s)) for s in sizes}
    with torch.no_grad():
        outs = {s: rt(x[s]) for s in sizes}
        again = rt(x[32])  # a cached static compilation answers the same
    static = [k for k in rt.compiled_shapes if k is not None]
    assert static == [((1, 3, s, s),) for s in sizes[: rt.max_static]]
    assert None in rt.compiled_shapes  # the 5th and 6th shapes share one dynamic compilation
    assert torch.equal(again, outs[32])
    with torch.no_grad():
        for s in sizes:
            assert torch.allclose(outs[s], qm(x[s]), atol=8 * float(qm.model.get_submodule(qm.layers[-1].quantizer).scale))


def test_saved_file_is_the_qdq_onnx(ov, tmp_path):
    import onnx

    path = ov.save(tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
