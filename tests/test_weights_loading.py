"""State-dict files: formats, containers and the errors users see for bad files."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import require_asset
from qdet.errors import WeightsError
from qdet.models.cifar_resnet import resnet20, resnet56
from qdet.models.weights import load_into, load_state_dict_file


def _toy() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"state_dict": sd, "meta": {"epoch": 3}},
                                  lambda sd: {"model": sd}, lambda sd: {"model": {"state_dict": sd}}])
def test_torch_file_round_trip_and_containers(tmp_path: Path, wrap) -> None:
    source = _toy()
    path = tmp_path / "w.pt"
    torch.save(wrap(source.state_dict()), path)
    state = load_state_dict_file(path)
    assert set(state) == set(source.state_dict())
    model = load_into(_toy(), state, source=str(path))
    torch.testing.assert_close(model[0].weight, source[0].weight)


def test_safetensors_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = _toy()
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    model = load_into(_toy(), load_state_dict_file(path), source=str(path))
    torch.testing.assert_close(model[2].bias, source[2].bias)


def test_wrapper_prefix_is_stripped_when_the_model_expects_bare_keys(tmp_path: Path) -> None:
    source = _toy()
    path = tmp_path / "dp.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    assert all(k.startswith("module.") for k in load_state_dict_file(path))
    assert set(load_state_dict_file(path, expected_keys_from=_toy())) == set(source.state_dict())


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="nope.pt.*does not exist"):
        load_state_dict_file(tmp_path / "nope.pt")


@pytest.mark.parametrize("name", ["garbage.pt", "garbage.pth", "garbage.safetensors", "empty.pt"])
def test_corrupt_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"" if name.startswith("empty") else b"\x80\x02not a checkpoint at all" * 50)
    with pytest.raises(WeightsError, match=name.replace(".", r"\.") + ".*corrupt"):
        load_state_dict_file(path)


def test_pickled_module_is_refused_without_running_its_code(tmp_path: Path) -> None:
    path = tmp_path / "whole_model.pt"
    torch.save(_toy(), path)
    with pytest.raises(WeightsError, match="whole_model.pt.*pickled Python objects"):
        load_state_dict_file(path)


@pytest.mark.parametrize("content", [[torch.zeros(2)], {}, {"weight": torch.zeros(2), "epoch": 3}])
def test_not_a_state_dict(tmp_path: Path, content) -> None:
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    with pytest.raises(WeightsError, match="odd.pt.*does not hold a state dict"):
        load_state_dict_file(path)


def test_load_into_reports_shape_mismatches() -> None:
    state = resnet20(num_classes=10).state_dict()
    with pytest.raises(WeightsError) as info:
        load_into(resnet20(num_classes=100), state, source="x.pt", model_name="resnet20")
    assert str(info.value) == ("weights 'x.pt' do not fit resnet20: 2 shape mismatches, e.g. linear.weight "
                               "(10, 64) in file vs (100, 64) in model, linear.bias (10,) in file vs (100,) in model")


def test_load_into_lists_at_most_five_missing_and_unexpected_keys() -> None:
    state = resnet56().state_dict()
    with pytest.raises(WeightsError, match=r"do not fit CifarResNet: \d+ unexpected keys in the file, e\.g\. ") as info:
        load_into(resnet20(), state, source="big.pt")
    assert str(info.value).endswith(", ...")
    assert str(info.value).count("layer") == 5
    partial = {k: v for k, v in resnet20().state_dict().items() if k != "linear.bias"}
    with pytest.raises(WeightsError, match="1 key missing from the file, e.g. linear.bias$"):
        load_into(resnet20(), partial, source="part.pt")


def test_load_into_tolerates_missing_num_batches_tracked() -> None:
    source = resnet20()
    source.bn1.running_mean.normal_()
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    model = load_into(resnet20(), state, source="<memory>")
    torch.testing.assert_close(model.bn1.running_mean, source.bn1.running_mean)


def test_fp16_weights_load_into_a_float_model() -> None:
    source = _toy()
    state = {k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()}
    model = load_into(_toy(), state, source="<memory>")
    assert model[0].weight.dtype == torch.float32


@pytest.mark.assets
def test_resnet20_file_into_resnet56_names_the_file() -> None:
    path = require_asset("weights/cifar10_resnet20.pt")
    state = load_state_dict_file(path, expected_keys_from=resnet56())
    with pytest.raises(WeightsError, match=r"cifar10_resnet20\.pt' do not fit resnet56: 180 keys missing"):
        load_into(resnet56(), state, source=str(path), model_name="resnet56")


@pytest.mark.assets
def test_resnet20_file_into_resnet56_via_adapter() -> None:
    from qdet.models import REGISTRY

    path = require_asset("weights/cifar10_resnet20.pt")
    with pytest.raises(WeightsError, match="cifar10_resnet20.pt"):
        REGISTRY.get("resnet56").build(weights=path)


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/qdet_weights_pwned",))


def test_reduce_payload_is_refused_naming_the_global_and_the_fix(tmp_path: Path) -> None:
    import os

    marker = Path("/tmp/qdet_weights_pwned")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pt"
    torch.save({"w": _Payload()}, path)
    with pytest.raises(WeightsError) as exc:
        load_state_dict_file(path)
    text = str(exc.value)
    assert "evil.pt" in text and "refused" in text and "system" in text and "arbitrary code" in text
    assert "state_dict()" in text and "weights_only=False" not in text  # never advise executing the pickle
    assert not marker.exists() and os.path.exists(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_weights_are_blamed_on_the_file_naming_the_key(tmp_path: Path, value: float) -> None:
    state = _toy().state_dict()
    state["2.bias"][1] = value
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"weights file '.*nan\.pt': tensor '2\.bias' contains NaN or Inf"):
        load_into(_toy(), load_state_dict_file(path), source=str(path))


def test_integer_tensor_where_the_model_has_float_is_a_dtype_mismatch() -> None:
    state = _toy().state_dict()
    state["0.weight"] = state["0.weight"].to(torch.int32)
    with pytest.raises(WeightsError, match=r"1 dtype mismatch, e\.g\. 0\.weight is torch\.int32"):
        load_into(_toy(), state, source="x.pt")
