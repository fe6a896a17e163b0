"""Datasets and the tensor loader: the embedded shapes set, CIFAR/MNIST paths, batching and augmentation."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torch import nn

from lctrun.config import DataConfig
from lctrun.data import TensorLoader, load_data
from lctrun.data.bundle import channel_stats
from lctrun.data.loader import random_crop, random_flip
from lctrun.data.shapes import load_shapes
from lctrun.errors import ConfigError, DataNotFoundError
from lctrun.models.cnn import cnn_small

# ---------------------------------------------------------------------------------------------------------------
# shapes


@pytest.fixture(scope="module")
def shapes():
    return load_shapes(600, 200, seed=0)


def test_shapes_deterministic_per_seed(shapes):
    again = load_shapes(600, 200, seed=0)
    for a, b in [
        (shapes.train_x, again.train_x),
        (shapes.train_y, again.train_y),
        (shapes.test_x, again.test_x),
        (shapes.test_y, again.test_y),
    ]:
        assert torch.equal(a, b)
    other = load_shapes(600, 200, seed=1)
    assert not torch.equal(shapes.train_x, other.train_x)
    assert not torch.equal(shapes.test_x, other.test_x)


def test_shapes_layout(shapes):
    assert shapes.name == "shapes" and shapes.num_classes == 10 and shapes.augment == "none"
    assert shapes.train_x.shape == (600, 3, 32, 32) and shapes.train_x.dtype == torch.uint8
    assert shapes.test_x.shape == (200, 3, 32, 32) and shapes.test_x.dtype == torch.uint8
    assert shapes.train_y.shape == (600,) and shapes.train_y.dtype == torch.int64
    assert shapes.test_y.dtype == torch.int64
    for y in (shapes.train_y, shapes.test_y):
        assert y.min() >= 0 and y.max() <= 9
        assert set(y.tolist()) == set(range(10))
    assert shapes.in_shape == (3, 32, 32)
    mean, std = channel_stats(shapes.train_x)
    assert torch.allclose(shapes.mean, mean) and torch.allclose(shapes.std, std)
    # images use the whole range and are not constant
    assert shapes.train_x.float().std() > 20


def test_shapes_train_and_test_share_no_images(shapes):
    train = shapes.train_x.flatten(1).float()
    test = shapes.test_x.flatten(1).float()
    assert not torch.equal(train[: len(test)], test)
    dist = torch.cdist(test, train)  # (200, 600)
    assert dist.min() > 0, "a test image also occurs in the training set"


def test_shapes_generation_is_vectorised():
    # this process's CPU seconds, not wall-clock, so a busy machine cannot fail it: ~1 s when the generator
    # draws whole batches, minutes when it loops over pixels
    start = time.process_time()
    load_shapes(3000, 1000, seed=3)
    assert time.process_time() - start < 20.0


def _accuracy(model: nn.Module, loader: TensorLoader) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y, _ in loader:
            correct += (model(x).argmax(1) == y).sum().item()
    model.train()
    return correct / len(loader.y)


def test_shapes_is_learnable():
    """A few hundred SGD steps of the small CNN get well above chance (10 %)."""
    torch.manual_seed(0)
    data = load_shapes(4000, 1000, seed=0)
    model = cnn_small(10, data.in_shape)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    train = TensorLoader(data.train_x, data.train_y, 64, shuffle=True, mean=data.mean, std=data.std, seed=0)
    test = TensorLoader(data.test_x, data.test_y, 500, shuffle=False, mean=data.mean, std=data.std)
    for epoch in range(3):  # ~190 steps (~55-60 % here): ~12 s on 2 idle cores
        train.set_epoch(epoch)
        for x, y, _ in train:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    acc = _accuracy(model, test)
    assert acc >= 0.35, f"test accuracy {acc:.3f}"


# ---------------------------------------------------------------------------------------------------------------
# TensorLoader and augmentation


def _loader_data(n=103):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def _epoch(loader: TensorLoader, epoch: int):
    loader.set_epoch(epoch)
    return list(loader)


def test_loader_covers_every_sample_once_per_epoch():
    x, y = _loader_data()
    loader = TensorLoader(x, y, 10, shuffle=True, seed=5)
    assert len(loader) == 11
    for epoch in range(3):
        batches = _epoch(loader, epoch)
        idx = torch.cat([b.idx for b in batches])
        assert sorted(idx.tolist()) == list(range(len(y)))
        assert torch.equal(torch.cat([b.y for b in batches]), y[idx])
        assert torch.allclose(torch.cat([b.x for b in batches]), x[idx].float() / 255)
    dropped = TensorLoader(x, y, 10, shuffle=True, seed=5, drop_last=True)
    assert len(dropped) == 10 and sum(len(b.y) for b in dropped) == 100
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    normalised = torch.cat([b.x for b in TensorLoader(x, y, 10, shuffle=False, mean=mean, std=std)])
    assert torch.allclose(normalised, (x.float() / 255 - mean[:, None, None]) / std[:, None, None], atol=1e-6)
    for each in (loader, dropped):  # what a worker posts a receive for before the batch exists
        assert [each.batch_len(step) for step in range(1, len(each) + 1)] == [len(b.y) for b in each]


def test_loader_order_depends_only_on_seed_and_epoch():
    x, y = _loader_data()
    a = TensorLoader(x, y, 16, shuffle=True, seed=7, augment="crop-flip")
    b = TensorLoader(x, y, 16, shuffle=True, seed=7, augment="crop-flip")
    order = lambda loader, epoch: torch.cat([batch.idx for batch in _epoch(loader, epoch)])
    assert torch.equal(order(a, 2), order(b, 2))
    # same (seed, epoch) -> the same augmented inputs too, whatever happened before
    _epoch(a, 0)
    xa, xb = torch.cat([t.x for t in _epoch(a, 2)]), torch.cat([t.x for t in _epoch(b, 2)])
    assert torch.equal(xa, xb)
    assert not torch.equal(order(a, 0), order(a, 1))
    other = TensorLoader(x, y, 16, shuffle=True, seed=8)
    assert not torch.equal(order(a, 0), order(other, 0))
    plain = TensorLoader(x, y, 16, shuffle=False)
    assert torch.equal(order(plain, 0), torch.arange(len(y)))


def test_loader_without_inputs_yields_the_same_labels_and_indices():
    x, y = _loader_data()
    full = TensorLoader(x, y, 16, shuffle=True, seed=3, augment="crop-flip")
    light = TensorLoader(x, y, 16, shuffle=True, seed=3, augment="crop-flip", load_x=False)
    for epoch in range(2):
        fb, lb = _epoch(full, epoch), _epoch(light, epoch)
        assert len(fb) == len(lb)
        for f, g in zip(fb, lb, strict=True):
            assert g.x is None
            assert torch.equal(f.y, g.y) and torch.equal(f.idx, g.idx)


def test_loader_normalises_to_zero_mean_unit_std():
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(500, 3, 8, 8, generator=g) * torch.tensor([60.0, 120.0, 250.0])[:, None, None]).to(torch.uint8)
    y = torch.zeros(500, dtype=torch.long)
    mean, std = channel_stats(x)
    loader = TensorLoader(x, y, 64, shuffle=False, mean=mean, std=std)
    out = torch.cat([b.x for b in loader])
    assert out.dtype == torch.float32
    per_channel = out.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-3)
    assert torch.allclose(per_channel.std(1), torch.ones(3), atol=1e-2)


def test_random_crop_is_an_independent_shifted_window_per_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 8, 8, generator=g) + 0.1  # no zeros: padding is recognisable
    out = random_crop(x, 2, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    padded = TF.pad(x, [2])
    offsets = []
    for i in range(len(x)):
        found = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[i], padded[i, :, dy : dy + 8, dx : dx + 8])
        ]
        assert len(found) == 1, f"sample {i} is not a window of its padded image"
        offsets.append(found[0])
    assert len(set(offsets)) > 5, "all samples of a batch got the same crop"
    # padding 0: the only window is the image itself
    assert torch.equal(random_crop(x, 0, torch.Generator().manual_seed(2)), x)


def test_random_flip_flips_about_half():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1000, 1, 4, 4, generator=g)
    out = random_flip(x, torch.Generator().manual_seed(3))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert bool((flipped ^ kept).all()), "every sample is either flipped or unchanged"
    assert 400 < int(flipped.sum()) < 600


# ---------------------------------------------------------------------------------------------------------------
# CIFAR, from files in the real python-pickle layout


def _write_pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar_arrays(rng: np.random.Generator, n: int, low: int, high: int, classes: int):
    data = rng.integers(low, high, size=(n, 3 * 32 * 32), dtype=np.uint8)  # rows: R plane, G plane, B plane
    labels = [int(i % classes) for i in range(n)]
    return data, labels


def write_cifar10(root: Path, per_batch: int = 20, test: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Train pixels in 0..99 with red brighter than blue; test pixels in 150..255: statistics differ."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    train = []
    for i in range(1, 6):
        data, labels = _cifar_arrays(rng, per_batch, 0, 100, 10)
        data[:, :1024] += 50  # red channel brighter
        train.append(data)
        _write_pickle(
            folder / f"data_batch_{i}",
            {"batch_label": f"training batch {i} of 5", "labels": labels, "data": data, "filenames": []},
        )
    test_data, test_labels = _cifar_arrays(rng, test, 150, 256, 10)
    _write_pickle(
        folder / "test_batch",
        {"batch_label": "testing batch 1 of 1", "labels": test_labels, "data": test_data, "filenames": []},
    )
    _write_pickle(
        folder / "batches.meta",
        {"num_cases_per_batch": per_batch, "label_names": [f"c{i}" for i in range(10)], "num_vis": 3072},
    )
    return np.concatenate(train), test_data


def write_cifar100(root: Path, train: int = 150, test: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    train_data, train_labels = _cifar_arrays(rng, train, 0, 100, 100)
    test_data, test_labels = _cifar_arrays(rng, test, 150, 256, 100)
    for name, data, labels in [("train", train_data, train_labels), ("test", test_data, test_labels)]:
        _write_pickle(
            folder / name,
            {
                "filenames": [],
                "batch_label": name,
                "fine_labels": labels,
                "coarse_labels": [lab // 5 for lab in labels],
                "data": data,
            },
        )
    _write_pickle(
        folder / "meta",
        {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]},
    )
    return train_data, test_data


@pytest.fixture
def no_md5(monkeypatch):
    # torchvision checks every CIFAR file (batches and meta) against the MD5 sum of the real download,
    # which small files written by a test can never match. `CIFAR10._check_integrity` covers the batch
    # files, but `_load_meta` calls the module-level `check_integrity` itself, so patch that function in
    # torchvision's cifar module (it serves both), keeping its "the file exists" part.
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def _expected_mean(data: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(data.reshape(-1, 3, 1024).astype(np.float64).mean(axis=(0, 2)) / 255.0).float()


def test_cifar10_from_pickle_files(tmp_path, no_md5):
    train, test = write_cifar10(tmp_path)
    bundle = load_data(DataConfig(name="cifar10", root=str(tmp_path)), seed=0)
    assert bundle.name == "cifar10" and bundle.num_classes == 10 and bundle.augment == "crop-flip"
    assert bundle.train_x.shape == (100, 3, 32, 32) and bundle.train_x.dtype == torch.uint8
    assert bundle.test_x.shape == (30, 3, 32, 32) and bundle.test_x.dtype == torch.uint8
    assert bundle.train_y.dtype == torch.int64 and bundle.train_y.tolist() == [i % 10 for i in range(20)] * 5
    assert bundle.test_y.tolist() == [i % 10 for i in range(30)]
    # pixels land in the right (channel, row, column)
    assert torch.equal(bundle.train_x[0], torch.as_tensor(train[0]).reshape(3, 32, 32))
    assert torch.equal(bundle.test_x[-1], torch.as_tensor(test[-1]).reshape(3, 32, 32))
    # statistics: from the training split only
    assert torch.allclose(bundle.mean, _expected_mean(train), atol=1e-4)
    assert not torch.allclose(bundle.mean, _expected_mean(test), atol=0.1)
    assert bundle.mean[0] > bundle.mean[2] + 0.1
    no_aug = load_data(DataConfig(name="cifar10", root=str(tmp_path), augment=False), seed=0)
    assert no_aug.augment == "none"


def test_cifar100_from_pickle_files(tmp_path, no_md5):
    train, test = write_cifar100(tmp_path)
    bundle = load_data(DataConfig(name="cifar100", root=str(tmp_path)), seed=0)
    assert bundle.name == "cifar100" and bundle.num_classes == 100 and bundle.augment == "crop-flip"
    assert bundle.train_x.shape == (150, 3, 32, 32) and bundle.train_x.dtype == torch.uint8
    assert bundle.test_x.shape == (40, 3, 32, 32)
    assert bundle.train_y.tolist() == [i % 100 for i in range(150)]  # fine labels, not coarse
    assert int(bundle.train_y.max()) == 99
    assert torch.equal(bundle.train_x[5], torch.as_tensor(train[5]).reshape(3, 32, 32))
    assert torch.allclose(bundle.mean, _expected_mean(train), atol=1e-4)
    assert not torch.allclose(bundle.mean, _expected_mean(test), atol=0.1)
    # a subset recomputes the statistics on what it keeps
    sub = load_data(DataConfig(name="cifar100", root=str(tmp_path), train_size=50, test_size=10), seed=0)
    assert len(sub.train_y) == 50 and len(sub.test_y) == 10
    mean, _ = channel_stats(sub.train_x)
    assert torch.allclose(sub.mean, mean)


# ---------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("name, folder", [("cifar10", "cifar-10-batches-py"), ("mnist", "MNIST")])
def test_missing_dataset_says_where_it_looked_and_how_to_fix_it(tmp_path, name, folder):
    with pytest.raises(DataNotFoundError) as info:
        load_data(DataConfig(name=name, root=str(tmp_path)), seed=0)
    message = str(info.value)
    assert str(tmp_path / folder) in message
    assert "LCTRUN_DATA" in message and "download" in message


def test_missing_dataset_under_lctrun_data(tmp_path, monkeypatch):
    monkeypatch.setenv("LCTRUN_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataNotFoundError, match="nowhere"):
        load_data(DataConfig(name="fashion-mnist"), seed=0)


def test_unknown_dataset_names_the_nearest():
    with pytest.raises(ConfigError, match="mnist"):
        load_data(DataConfig(name="mnsit"), seed=0)
    with pytest.raises(ConfigError, match="cifar10"):
        load_data(DataConfig(name="cifar-10"), seed=0)


# ---------------------------------------------------------------------------------------------------------------
# MNIST from LCTRUN_DATA


def _real_data_root() -> Path:
    root = os.environ.get("LCTRUN_DATA")
    if not root:
        if os.environ.get("CI"):  # CI has the data: a missing variable is a broken CI, never a skip
            pytest.fail("LCTRUN_DATA is not set under CI (.ci/run sets it to ../shared/data)")
        pytest.skip("LCTRUN_DATA is not set: point it at the folder holding MNIST/raw to run this test")
    raw = Path(root) / "MNIST" / "raw"
    needed = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    missing = [n for n in needed if not (raw / n).is_file()]
    if missing:
        pytest.skip(f"MNIST files missing under {raw}: {', '.join(missing)}")
    return Path(root)


def test_mnist_from_lctrun_data():
    _real_data_root()
    bundle = load_data(DataConfig(name="mnist"), seed=0)
    assert bundle.train_x.shape == (60000, 1, 28, 28) and bundle.train_x.dtype == torch.uint8
    assert bundle.test_x.shape == (10000, 1, 28, 28)
    assert bundle.num_classes == 10 and bundle.augment == "none"
    assert set(bundle.train_y.unique().tolist()) == set(range(10))
    assert abs(float(bundle.mean[0]) - 0.1307) < 1e-3 and abs(float(bundle.std[0]) - 0.3081) < 1e-3


def test_mnist_subsets_are_deterministic_per_seed():
    _real_data_root()
    cfg = DataConfig(name="mnist", train_size=1000, test_size=300)
    a, b, c = load_data(cfg, seed=0), load_data(cfg, seed=0), load_data(cfg, seed=1)
    assert a.train_x.shape == (1000, 1, 28, 28) and a.test_x.shape == (300, 1, 28, 28)
    assert len(a.train_y) == 1000 and len(a.test_y) == 300
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    mean, std = channel_stats(a.train_x)
    assert torch.allclose(a.mean, mean) and torch.allclose(a.std, std)
