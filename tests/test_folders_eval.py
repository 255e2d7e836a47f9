"""Image-folder datasets, seeded subsets, loaders and the top-k evaluator."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import require_asset
from qdet.data.folders import (CIFAR10_CLASSES, IMAGENETTE_WNID_TO_IMAGENET, ImageFolderDataset, cifar10_folder,
                               classification_transform, imagenette_folder, make_loader, seeded_subset)
from qdet.errors import ConfigError, DataError
from qdet.eval.classification import TopKResult, evaluate_topk


def _write_folder(root: Path, classes: dict[str, int], size: int = 8, ext: str = ".png") -> Path:
    for c, count in classes.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (size, size), color=(10 * i, 100, 200)).save(root / c / f"{i}{ext}")
    return root


# --- ImageFolderDataset ------------------------------------------------------------------------------

def test_image_folder_sorts_classes_and_labels_samples(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "ds", {"zebra": 2, "ant": 3, "moth": 1})
    (root / "ant" / "notes.txt").write_text("ignored")
    ds = ImageFolderDataset(root, transform=classification_transform())
    assert ds.classes == ["ant", "moth", "zebra"]
    assert len(ds) == 6
    assert [y for _, y in ds] == [0, 0, 0, 1, 2, 2]
    assert ds[0][0].shape == (3, 8, 8) and ds[0][0].dtype == torch.float32


def test_transform_normalises_with_mean_and_std(tmp_path: Path) -> None:
    root = tmp_path / "ds" / "c"
    root.mkdir(parents=True)
    Image.new("RGB", (4, 4), color=(255, 0, 51)).save(root / "a.png")
    x, _ = ImageFolderDataset(tmp_path / "ds", transform=classification_transform((0.5, 0.5, 0.2), (0.5, 0.25, 0.1)))[0]
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, -2.0, 0.0]))


def test_transform_resize_and_crop() -> None:
    t = classification_transform(resize=256, crop=224)
    assert t(Image.new("RGB", (500, 300))).shape == (3, 224, 224)


def test_jpeg_and_grayscale_images_become_rgb(tmp_path: Path) -> None:
    (tmp_path / "ds" / "c").mkdir(parents=True)
    Image.new("L", (6, 5), color=128).save(tmp_path / "ds" / "c" / "g.JPEG")
    x, _ = ImageFolderDataset(tmp_path / "ds", transform=classification_transform())[0]
    assert x.shape == (3, 5, 6)


def test_missing_folder_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere.*does not exist"):
        ImageFolderDataset(tmp_path / "nowhere")


def test_folder_without_classes_or_images_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{tmp_path.name}.*no class sub-folders"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=f"{tmp_path.name}.*contains no images"):
        ImageFolderDataset(tmp_path)


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "ds", {"cat": 1})
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    ds = ImageFolderDataset(root, transform=classification_transform())
    index = [p.name for p, _ in ds.samples].index("broken.png")
    with pytest.raises(DataError, match=r"broken\.png"):
        ds[index]


def test_imagenette_labels_are_imagenet_indices(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "val", {"n03888257": 1, "n01440764": 2}, size=40, ext=".JPEG")
    ds = imagenette_folder(root, resize=None, crop=32)
    assert [y for _, y in ds] == [0, 0, 701]
    assert ds[0][0].shape == (3, 32, 32)


def test_imagenette_rejects_unknown_wnids(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "val", {"n01440764": 1, "n99999999": 1})
    with pytest.raises(DataError, match="n99999999"):
        imagenette_folder(root)


def test_cifar_folder_needs_ten_classes(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="expected 10"):
        cifar10_folder(_write_folder(tmp_path / "test", {"cat": 1}))


# --- subsets and loaders ---------------------------------------------------------------------------------

def test_seeded_subset_is_reproducible_and_distinct() -> None:
    ds = TensorDataset(torch.arange(100))
    a, b, c = seeded_subset(ds, 10, seed=1), seeded_subset(ds, 10, seed=1), seeded_subset(ds, 10, seed=2)
    assert a.indices == b.indices != c.indices
    assert len(set(a.indices)) == 10
    state = torch.random.get_rng_state()
    seeded_subset(ds, 10, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched


def test_seeded_subset_rejects_bad_sizes() -> None:
    ds = TensorDataset(torch.arange(5))
    with pytest.raises(DataError, match="6 samples from a dataset of 5"):
        seeded_subset(ds, 6, seed=0)
    with pytest.raises(ConfigError):
        seeded_subset(ds, 0, seed=0)


def test_make_loader_yields_image_label_batches(tmp_path: Path) -> None:
    ds = ImageFolderDataset(_write_folder(tmp_path / "ds", {"a": 3, "b": 2}), transform=classification_transform())
    batches = list(make_loader(ds, 2))
    assert [x.shape for x, _ in batches] == [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]
    assert torch.cat([y for _, y in batches]).tolist() == [0, 0, 0, 1, 1]
    order1 = torch.cat([y for _, y in make_loader(ds, 2, shuffle=True, seed=5)])
    order2 = torch.cat([y for _, y in make_loader(ds, 2, shuffle=True, seed=5)])
    assert torch.equal(order1, order2)


# --- evaluate_topk ------------------------------------------------------------------------------------------

def _fixed_logits_loader() -> DataLoader:
    # 4 images; labels chosen so that top-1 hits 1/4 and top-5 hits 3/4 for the ranking below.
    return DataLoader(TensorDataset(torch.zeros(4, 3, 2, 2), torch.tensor([9, 3, 5, 0])), batch_size=3)


def _ranking_model(x: torch.Tensor) -> torch.Tensor:
    # Class scores 9 > 8 > ... > 0: top-1 = {9}, top-5 = {9, 8, 7, 6, 5}. Label 3 and 0 miss top-5.
    return torch.arange(10.0).expand(x.shape[0], 10)


def test_topk_counts_hits() -> None:
    result = evaluate_topk(_ranking_model, _fixed_logits_loader(), progress=False)
    assert result == TopKResult(top1=25.0, top5=50.0, n_images=4)
    assert result.as_dict() == {"top1": 25.0, "top5": 50.0, "n_images": 4}


def test_topk_accepts_numpy_outputs_and_top1_only() -> None:
    result = evaluate_topk(lambda x: _ranking_model(x).numpy(), _fixed_logits_loader(), topk=(1,), progress=False)
    assert result.top1 == 25.0 and result.top5 is None


def test_topk_restores_training_mode_and_uses_inference_mode() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.Dropout(0.9)).train()
    evaluate_topk(model, _fixed_logits_loader(), progress=True)
    assert model.training


def test_topk_with_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    evaluate_topk(_ranking_model, _fixed_logits_loader(), progress=True, desc="toy")
    assert "toy" in capsys.readouterr().err


def test_topk_errors() -> None:
    empty = DataLoader(TensorDataset(torch.zeros(0, 3, 2, 2), torch.zeros(0, dtype=torch.long)), batch_size=2)
    with pytest.raises(DataError, match="no images"):
        evaluate_topk(_ranking_model, empty, progress=False)
    with pytest.raises(ConfigError, match="logits"):
        evaluate_topk(lambda x: torch.zeros(x.shape[0], 10, 2), _fixed_logits_loader(), progress=False)
    with pytest.raises(ConfigError, match="topk"):
        evaluate_topk(_ranking_model, _fixed_logits_loader(), topk=(3,), progress=False)


# --- real assets ---------------------------------------------------------------------------------------------

@pytest.mark.assets
def test_cifar10_test_folder() -> None:
    require_asset("cifar10/test")
    ds = cifar10_folder()
    assert len(ds) == 10_000 and tuple(ds.classes) == CIFAR10_CLASSES
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y == 0


@pytest.mark.assets
def test_imagenette_val_folder() -> None:
    require_asset("imagenette/val")
    ds = imagenette_folder()
    assert len(ds) == 3925
    labels = {ds.target_transform(i) for i in range(len(ds.classes))}
    assert labels == set(IMAGENETTE_WNID_TO_IMAGENET.values())
    x, y = ds[len(ds) - 1]
    assert x.shape == (3, 224, 224) and y == 701
    assert np.isfinite(x.numpy()).all()
