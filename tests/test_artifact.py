"""Saved .qdet files: int8 on disk, no pickle, exact reload, clear errors."""
import pytest
import torch
from torch import nn

from qdet import artifact
from qdet.config import Observer, OverflowFix, QuantConfig
from qdet.errors import WeightsError
from qdet.qmodel import quantize


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10)).eval()


@pytest.fixture
def qm():
    # 8-bit weights on every CPU (AUTO would pick 7 bits on x86 without VNNI): the forged-file messages name int8 ranges
    cfg = QuantConfig(activations=Observer.MINMAX, overflow_fix=OverflowFix.NONE)
    q = quantize(_net(), [torch.randn(4, 3, 8, 8) for _ in range(3)], cfg, progress=False)
    q.metrics = {"top1": 91.5}
    return q


def test_round_trip_is_exact_and_carries_config_and_metrics(qm, tmp_path):
    path = artifact.save(qm, tmp_path / "m.qdet")
    loaded = artifact.load(path, _net())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), qm(x))
    assert loaded.config == qm.config and loaded.metrics == {"top1": 91.5}


def test_weights_are_int8_on_disk(qm, tmp_path):
    from safetensors import safe_open

    path = artifact.save(qm, tmp_path / "m.qdet")
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("0.weight").dtype == torch.int8
        assert f.get_tensor("4.weight").dtype == torch.int8


def test_save_is_atomic_no_temp_left(qm, tmp_path):
    artifact.save(qm, tmp_path / "m.qdet")
    assert [p.name for p in tmp_path.iterdir()] == ["m.qdet"]


def test_missing_corrupt_and_wrong_architecture(qm, tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        artifact.load(tmp_path / "nope.qdet", _net())
    bad = tmp_path / "bad.qdet"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match="bad.qdet"):
        artifact.load(bad, _net())
    path = artifact.save(qm, tmp_path / "m.qdet")
    wrong = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    with pytest.raises(WeightsError, match="m.qdet"):
        artifact.load(path, wrong)


# ---- verification on load (issue 14): checksum, schema version, metadata bounds, no pickle ----
import json  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402

from qdet_forge import edit, read, write  # noqa: E402


@pytest.fixture
def saved(qm, tmp_path):
    return artifact.save(qm, tmp_path / "m.qdet")


def test_metadata_carries_schema_version_and_sha256(saved):
    raw, tensors = read(saved)
    assert raw["format"] == artifact.FORMAT == "qdet/2"
    assert raw["sha256"] == artifact.payload_sha256(raw, tensors)


def test_truncated_file_is_corrupt_or_truncated(saved, tmp_path):
    data = saved.read_bytes()
    bad = tmp_path / "cut.qdet"
    bad.write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightsError, match=r"'.*cut\.qdet'.*corrupt or truncated"):
        artifact.load(bad, _net())


def test_flipped_data_byte_fails_the_checksum(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    data[-50] ^= 0x10  # inside the tensor payload: safetensors parses it, only the checksum sees it
    bad = tmp_path / "flip.qdet"
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"flip\.qdet.*corrupt or truncated \(SHA-256"):
        artifact.load(bad, _net())


def test_edited_metadata_without_resigning_fails_the_checksum(saved, tmp_path):
    bad = edit(saved, tmp_path / "e.qdet", meta=lambda m: m.update(metrics='{"top1": 99.9}'), sign=False)
    with pytest.raises(WeightsError, match=r"e\.qdet.*SHA-256"):
        artifact.load(bad, _net())


def test_newer_schema_is_refused_with_upgrade_advice(saved, tmp_path):
    bad = edit(saved, tmp_path / "new.qdet", meta=lambda m: m.update(format="qdet/3"))
    with pytest.raises(WeightsError, match=r"new\.qdet.*newer qdet \(schema qdet/3.*upgrade qdet"):
        artifact.load(bad, _net())


def test_schema_1_file_without_checksum_loads_with_a_warning(saved, tmp_path):
    raw, ts = read(saved)
    raw.pop("sha256")
    raw["format"] = "qdet/1"
    old = write(tmp_path / "old.qdet", raw, ts, sign=False)
    with pytest.warns(UserWarning, match="without a checksum"):
        artifact.load(old, _net())


def _set_tensor(name, fn):
    def run(ts):
        ts[name] = fn(ts[name].clone())
    return run


@pytest.mark.parametrize("field, edit_kwargs, message", [
    ("scale NaN", dict(tensors=_set_tensor("0.weight_quant.scale", lambda t: t.fill_(float("nan")))),
     r"tensor '0\.weight_quant\.scale' \(layer '0'\): scales must be finite and > 0, found nan"),
    ("scale 0", dict(tensors=_set_tensor("4.weight_quant.scale", lambda t: t.fill_(0.0))),
     r"tensor '4\.weight_quant\.scale' \(layer '4'\): scales must be finite and > 0"),
    ("scale negative", dict(tensors=_set_tensor("0.weight_quant.scale", lambda t: t.neg_())),
     r"scales must be finite and > 0, found -"),
    ("scale inf", dict(tensors=_set_tensor("0.weight_quant.scale", lambda t: t.fill_(float("inf")))),
     r"0\.weight_quant\.scale.*NaN or Inf"),
    ("scale dtype", dict(tensors=_set_tensor("0.weight_quant.scale", lambda t: t.half())),
     r"tensor '0\.weight_quant\.scale' .*is torch\.float16, expected torch\.float32"),
    ("zero point", dict(tensors=_set_tensor("0.weight_quant.zero_point", lambda t: t.fill_(300))),
     r"0\.weight_quant\.zero_point.*zero points must lie in -127\.\.127"),
    ("int codes", dict(json_field="config", json_edit=lambda c: c["weights"].update(bits=4)),
     r"tensor '0\.weight' .*int weight codes must lie in -7\.\.7 \(4-bit\)"),
    ("bits 16", dict(json_field="config", json_edit=lambda c: c["weights"].update(bits=16)),
     r"field 'int_weights' lists '0\.weight'"),
    ("bits 40", dict(json_field="config", json_edit=lambda c: c["weights"].update(bits=40)),
     r"field 'config' .*bits"),
    ("bits str", dict(json_field="config", json_edit=lambda c: c["weights"].update(bits="8")),
     r"field 'config'"),
    ("bins", dict(json_field="config", json_edit=lambda c: c["activations"].update(bins=10**9)),
     r"field 'config' activations\.bins=1000000000 is outside 1\.\.65536"),
    ("config key", dict(json_field="config", json_edit=lambda c: c.update(colour="red")),
     r"field 'config' is invalid"),
    ("int_weights emptied", dict(json_field="int_weights", json_edit=lambda v: []),
     r"tensor '0\.weight' .*is torch\.int8, expected torch\.float32 \(an int weight not listed in 'int_weights'\?\)"),
    ("int_weights unknown", dict(json_field="int_weights", json_edit=lambda v: v + ["nope.weight"]),
     r"field 'int_weights' lists 'nope\.weight'"),
    ("huge input", dict(json_field="input_shapes", json_edit=lambda v: {"": [[10**6, 3, 10**6, 8]]}),
     r"field 'input_shapes' of region '': .* elements \(at most"),
    ("bad input", dict(json_field="input_shapes", json_edit=lambda v: {"": [[1, 5, 8, 8]]}),
     r"fields .*'input_shapes'.* do not fit Sequential"),
    ("region", dict(json_field="regions", json_edit=lambda v: ["nope"]),
     r"field 'input_shapes' must have one entry per region"),
    ("shape", dict(tensors=_set_tensor("4.bias", lambda t: t[:5])),
     r"tensor '4\.bias' \(layer '4'\) has shape \(5,\), model 'Sequential' expects \(10,\)|tensor '4\.bias'.*shape"),
    ("unknown tensor", dict(tensors=lambda ts: ts.update({"9.weight": torch.zeros(2)})),
     r"tensor '9\.weight' \(layer '9'\) does not exist in model"),
    ("missing tensor", dict(tensors=lambda ts: ts.pop("4.bias")),
     r"lacks tensor '4\.bias'"),
    ("NaN bias", dict(tensors=_set_tensor("4.bias", lambda t: t.fill_(float("nan")))),
     r"tensor '4\.bias' \(layer '4'\) contains NaN or Inf"),
    ("metrics", dict(meta=lambda m: m.update(metrics="[1, 2]")), r"field 'metrics' is not a JSON object"),
    ("calibration_batches", dict(meta=lambda m: m.update(calibration_batches="-3")), r"field 'calibration_batches'"),
    ("json", dict(meta=lambda m: m.update(regions="[")), r"metadata field 'regions' is not valid JSON"),
    ("missing field", dict(meta=lambda m: m.pop("config")), r"metadata field 'config' is missing"),
])
def test_forged_metadata_and_tensors_fail_naming_file_field_and_layer(saved, tmp_path, field, edit_kwargs, message):
    bad = edit(saved, tmp_path / "forged.qdet", **edit_kwargs)
    with pytest.raises(WeightsError, match=r"quantized model file '.*forged\.qdet'") as exc:
        artifact.load(bad, _net())
    assert len(str(exc.value).splitlines()) == 1
    import re
    assert re.search(message, str(exc.value)), str(exc.value)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/qdet_pwned_by_test",))


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickle_with_reduce_payload_is_refused_and_never_run(tmp_path, how):
    marker = "/tmp/qdet_pwned_by_test"
    if os.path.exists(marker):
        os.remove(marker)
    bad = tmp_path / "evil.qdet"
    if how == "pickle":
        bad.write_bytes(pickle.dumps(_Payload()))
    else:
        torch.save({"x": _Payload()}, bad)
    with pytest.raises(WeightsError, match=r"evil\.qdet.*is a pickle .*never unpickles"):
        artifact.load(bad, _net())
    with pytest.raises(WeightsError, match="never unpickles"):
        artifact.read_metadata(bad)
    assert not os.path.exists(marker)


def test_a_safetensors_header_length_ending_in_0x80_is_not_mistaken_for_a_pickle(tmp_path):
    path = tmp_path / "h.qdet"
    path.write_bytes((0x80).to_bytes(8, "little") + b'{"__metadata__": {}}' + b" " * 108)
    assert not artifact._looks_like_pickle(path)
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    assert artifact._looks_like_pickle(path)
