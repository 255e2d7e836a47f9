"""`qdet quantize --model-file`: user models from a file through the CLI, and every bad input as one line.

Tiny models are written to tmp_path; the CLI runs in-process with small inputs and few images.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from qdet.cli import main
from qdet.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODELS = '''
import torch
from torch import nn
import torch.nn.functional as F


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU6(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.features(x))


def build():
    torch.manual_seed(0)
    return ConvNet()


class FunctionalNet(nn.Module):
    """Convolutions written with F.conv2d / F.linear on the module's own parameters."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.2)
        self.b1 = nn.Parameter(torch.zeros(8))
        self.w2 = nn.Parameter(torch.randn(10, 8) * 0.2)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        return F.linear(F.adaptive_avg_pool2d(x, 1).flatten(1), self.w2)


def functional():
    torch.manual_seed(0)
    return FunctionalNet()


def no_conv():
    return nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def raises():
    raise ValueError("no weights for you")


def not_module():
    return 42


class ReturnsNone(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        self.c(x)
        return None


def returns_none():
    return ReturnsNone()


class ReturnsText(ReturnsNone):
    def forward(self, x):
        return "logits"


def returns_text():
    return ReturnsText()
'''

SMALL = ["--input-size", "3,32,32", "--calib-images", "8", "--eval-images", "8", "--no-bench", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("user_models")
    (root / "nets.py").write_text(MODELS)
    (root / "import_fails.py").write_text("import torch\nx = 1 / 0\n")
    (root / "prep.py").write_text("def to_text(image):\n    return 'not a tensor'\n\n\n"
                                  "def centred(image):\n    return image - 0.5\n")
    (root / "empty").mkdir()
    return root


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["quantize", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("function, runtime", [("build", "reference"), ("build", "openvino"),
                                               ("functional", "openvino")])
def test_model_file_quantizes_every_conv_and_linear(files, tmp_path, capsys, function, runtime):
    if runtime == "openvino":
        pytest.importorskip("openvino")
    out, js = tmp_path / "m.qdet", tmp_path / "m.json"
    code, stdout, err = _run(["--model-file", f"{files / 'nets.py'}:{function}", "--runtime", runtime, *SMALL,
                              "--out", str(out), "--json", str(js)], capsys)
    assert code == 0, err
    assert out.is_file() and out.stat().st_size > 0
    result = json.loads(js.read_text())
    cov = result["meta"]["coverage"]
    assert cov["float_layers"] == 0 and cov["int8_layers"] == (3 if function == "build" else 2)
    assert cov["int8_mac_share"] == 1.0
    assert cov["folded_batchnorms"] == (2 if function == "build" else 0)
    # no --data: seeded synthetic inputs, said in the title, every row and the metadata
    assert result["meta"]["synthetic"] is True and result["meta"]["data"] == "synthetic"
    assert all(r["data"] == "synthetic" for r in result["rows"]) and "top1" not in result["rows"][0]
    assert "synthetic" in stdout.splitlines()[0]
    int8 = result["rows"][2]
    assert int8["model"] == f"int8 ({runtime})" and int8["sqnr_db"] >= 25
    assert "coverage: " in stdout and f"{3 if function == 'build' else 2} of" in stdout
    if runtime == "openvino":  # what OpenVINO itself says it executes in int8
        executed = cov["runtime"]["openvino"]
        assert executed["float_convs"] == executed["float_matmuls"] == 0, executed
        assert executed["int8_convs"] + executed["int8_matmuls"] == cov["int8_layers"]
        assert "openvino executes" in stdout


def test_exported_program_and_labeled_folder(files, tmp_path, capsys):
    """A torch.export .pt2 file (input size from the program) calibrated and evaluated on a labeled folder."""
    import sys

    from PIL import Image

    sys.path.insert(0, str(files))
    try:
        import nets  # the same file the CLI imports by path
    finally:
        sys.path.remove(str(files))
    batch = torch.export.Dim("batch", min=1, max=256)
    ep = torch.export.export(nets.build().eval(), (torch.randn(2, 3, 32, 32),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(ep, tmp_path / "net.pt2")
    g = torch.Generator().manual_seed(0)
    for c in ("3", "7"):  # folders named by class index: labels the 10-way model's outputs can match
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(6):
            pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "data" / c / f"{i}.png")
    js = tmp_path / "m.json"
    code, _, err = _run(["--model-file", str(tmp_path / "net.pt2"), "--data", str(tmp_path / "data"),
                         "--preprocess", "imagenet", "--runtime", "reference", "--calib-images", "8",
                         "--no-bench", "--no-progress", "--json", str(js), "--out", str(tmp_path / "n.qdet")],
                        capsys)
    assert code == 0, err
    result = json.loads(js.read_text())
    assert result["meta"]["coverage"]["int8_layers"] == 3 and result["meta"]["coverage"]["folded_batchnorms"] == 2
    assert result["meta"]["labeled"] and result["meta"]["eval_images"] == 4  # 12 images: 8 calibrate, 4 held out
    assert all("top1" in r and r["data"] == "held-out images" for r in result["rows"])
    assert result["meta"]["input_size"] == [3, 32, 32]


def _export_onnx(files: Path, path: Path, *, dynamic_batch: bool) -> nn.Module:
    import sys

    sys.path.insert(0, str(files))
    try:
        import nets  # the same file the CLI imports by path
    finally:
        sys.path.remove(str(files))
    net = nets.build().eval()
    axes = {"x": {0: "batch"}} if dynamic_batch else None
    torch.onnx.export(net, (torch.randn(2, 3, 24, 24),), str(path), input_names=["x"], dynamic_axes=axes,
                      opset_version=17, dynamo=False)
    return net


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_onnx_file_quantizes_every_conv_and_linear_on_openvino(files, tmp_path, capsys):
    """An exported .onnx file: converted (onnx2torch), every conv/linear int8 as OpenVINO executes it,
    input size read from the file; the exporter folded the BatchNorms already, so none is left to fold."""
    pytest.importorskip("onnx2torch")
    pytest.importorskip("openvino")
    _export_onnx(files, tmp_path / "net.onnx", dynamic_batch=True)
    js = tmp_path / "m.json"
    code, _, err = _run(["--model-file", str(tmp_path / "net.onnx"), "--runtime", "openvino",
                              "--calib-images", "8", "--eval-images", "8", "--no-bench", "--no-progress",
                              "--json", str(js), "--out", str(tmp_path / "n.qdet")], capsys)
    assert code == 0, err
    result = json.loads(js.read_text())
    cov = result["meta"]["coverage"]
    assert cov["int8_layers"] == 3 and cov["float_layers"] == 0 and cov["int8_mac_share"] == 1.0
    assert cov["folded_batchnorms"] == 0 and cov["unfolded_batchnorms"] == []
    executed = cov["runtime"]["openvino"]
    assert executed["float_convs"] == executed["float_matmuls"] == 0
    assert executed["int8_convs"] + executed["int8_matmuls"] == 3
    assert result["meta"]["input_size"] == [3, 24, 24]
    assert result["rows"][2]["sqnr_db"] >= 25


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_onnx_conversion_matches_the_original_and_bad_ops_are_named(files, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnx2torch")
    from qdet.errors import ModelError
    from qdet.user_model import load_model, model_input_shape, parse_model_file

    net = _export_onnx(files, tmp_path / "fixed.onnx", dynamic_batch=False)
    spec = parse_model_file(str(tmp_path / "fixed.onnx"))
    assert model_input_shape(spec) == (2, (3, 24, 24))
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.allclose(load_model(spec)(x), net(x), atol=1e-5)
    proto = onnx.load(str(tmp_path / "fixed.onnx"))
    proto.graph.node[0].op_type = "NoSuchOp"  # an op onnx2torch has no converter for
    onnx.save(proto, str(tmp_path / "bad_op.onnx"))
    with pytest.raises(ModelError, match=r"bad_op\.onnx.*NoSuchOp"):
        load_model(parse_model_file(str(tmp_path / "bad_op.onnx")))


def _bad_cases(files: Path) -> list[tuple[list[str], list[str]]]:
    nets = files / "nets.py"
    return [
        (["--model-file", str(files / "missing.py") + ":build"], ["missing.py", "not found"]),
        (["--model-file", str(nets)], ["nets.py", "FUNCTION", "build"]),
        (["--model-file", f"{nets}:nope"], ["nets.py:nope", "no function 'nope'"]),
        (["--model-file", f"{files / 'import_fails.py'}:build"], ["import_fails.py", "ZeroDivisionError", "line 2"]),
        (["--model-file", f"{nets}:raises"], ["nets.py:raises", "raises()", "ValueError: no weights for you"]),
        (["--model-file", f"{nets}:not_module"], ["nets.py:not_module", "returned int", "nn.Module"]),
        (["--model-file", f"{nets}:returns_none"], ["nets.py:returns_none", "NoneType", "tensor"]),
        (["--model-file", f"{nets}:returns_text"], ["nets.py:returns_text", "returned str", "tensor"]),
        (["--model-file", f"{nets}:no_conv"], ["nets.py:no_conv", "no quantizable op"]),
        (["--model-file", f"{nets}:build", "--input-size", "3,x,32"], ["--input-size", "3,x,32"]),
        (["--model-file", f"{nets}:build", "--input-size", "0,32"], ["--input-size", "0,32"]),
        (["--model-file", f"{nets}:build", "--preprocess", "mean=1,2"], ["--preprocess", "mean=1,2"]),
        (["--model-file", f"{nets}:build", "--preprocess", "mean=0,0,0;std=1,0,1"], ["--preprocess", "std"]),
        (["--model-file", f"{nets}:build", "--preprocess", f"{files / 'prep.py'}:to_text"],
         ["--preprocess", "prep.py:to_text", "returned str"]),
        (["--model-file", f"{nets}:build", "--data", str(files / "nowhere")], ["--data", "nowhere", "not found"]),
        (["--model-file", f"{nets}:build", "--data", str(files / "empty")], ["--data", "empty", "no images"]),
        (["--model-file", str(files / "nets.txt")], ["nets.txt", ".py:FUNCTION"]),
    ]


def test_every_bad_input_is_one_line_exit_2(files, tmp_path, capsys):
    (files / "m.onnx").write_bytes(b"\x08\x07garbage")
    cases = _bad_cases(files) + [(["--model-file", str(files / "m.onnx")], ["m.onnx", "not an ONNX model"])]
    for args, expected in cases:
        code, stdout, err = _run([*SMALL, *args, "--out", str(tmp_path / "x.qdet")], capsys)
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("qdet: error: "), (args, err)
        for text in expected:
            assert text in lines[0], (args, text, lines[0])
        assert "Traceback" not in err and stdout == "", (args, stdout)
    assert not (tmp_path / "x.qdet").exists()


def test_model_name_and_model_file_exclusive(files, capsys):
    code, _, err = _run(["resnet20", "--model-file", f"{files / 'nets.py'}:build"], capsys)
    assert code == 2 and "not both" in err
    code, _, err = _run([], capsys)
    assert code == 2 and "--model-file" in err


def test_python_api_rejects_a_model_without_quantizable_ops():
    import qdet

    net = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with pytest.raises(ConfigError, match="no quantizable op"):
        qdet.quantize(net, [torch.randn(2, 3, 8, 8)], progress=False)


def test_parsers():
    from qdet.user_data import parse_input_size, parse_preprocess
    from qdet.user_model import parse_model_file

    assert parse_input_size("224,224") == (3, 224, 224) and parse_input_size("1,28,28") == (1, 28, 28)
    norm = parse_preprocess("mean=0.5;std=0.25", channels=3)
    assert torch.allclose(norm(torch.ones(3, 2, 2)), torch.full((3, 2, 2), 2.0))
    assert str(parse_preprocess("imagenet", channels=3)).startswith("mean=0.485")
    spec = parse_model_file("dir/my_net.py:build")
    assert spec.run_name == "my_net_build" and spec.kind.value == "python"
    assert parse_model_file("m.pt2").run_name == "m"


def test_folder_labels_that_cannot_be_class_indices_are_not_used(files, tmp_path, capsys):
    """2 class folders named cat/dog vs a 10-way model: no accuracy against the wrong classes (and a
    `file.py:fn` preprocessing)."""
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (32, 32), (40 * i, 100, 200)).save(tmp_path / "data" / c / f"{i}.png")
    js = tmp_path / "m.json"
    code, stdout, err = _run(["--model-file", f"{files / 'nets.py'}:build", "--data", str(tmp_path / "data"),
                              *SMALL, "--runtime", "reference", "--preprocess", f"{files / 'prep.py'}:centred", "--json", str(js), "--out", str(tmp_path / "m.qdet")],
                             capsys)
    assert code == 0, err
    result = json.loads(js.read_text())
    assert not result["meta"]["labeled"] and "top1" not in result["rows"][0] and "agree_top1" in result["rows"][0]
    assert "labels not used: 2 class folders vs 10 model outputs" in stdout


def test_exported_program_becomes_modules_named_like_the_layers(tmp_path):
    """ATen conv/linear/batch-norm on the program's parameters → nn modules (same outputs, original names)."""
    from torch.nn import functional as F

    from qdet.user_model import exported_to_module

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.w = nn.Parameter(torch.randn(5, 4))

        def forward(self, x):
            return F.linear(torch.relu(self.bn(self.conv(x))).mean((2, 3)), self.w)

    net = Net().eval()
    torch.export.save(torch.export.export(net, (torch.randn(1, 3, 8, 8),)), tmp_path / "n.pt2")
    gm = exported_to_module(torch.export.load(tmp_path / "n.pt2"))
    kinds = {name: type(m) for name, m in gm.named_modules() if name}
    assert kinds["conv"] is nn.Conv2d and kinds["bn"] is nn.BatchNorm2d
    assert any(t is nn.Linear for t in kinds.values()) and "w" not in dict(gm.named_parameters())
    x = torch.randn(1, 3, 8, 8)
    assert torch.allclose(gm.eval()(x), net(x), atol=1e-6)


def test_outputs_that_hardly_vary_are_flagged():
    from qdet.user_job import _varies

    assert _varies(torch.randn(4, 10)) and _varies((torch.randn(2, 3), None))
    assert not _varies(torch.full((4, 10), 0.3) + 1e-9 * torch.randn(4, 10))
