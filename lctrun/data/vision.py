"""The real image datasets, read through torchvision's dataset classes into tensors."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lctrun.data.bundle import DataBundle, channel_stats
from lctrun.errors import DataNotFoundError

# name -> (torchvision class name, folder torchvision looks in, classes, augmentation)
VISION = {
    "mnist": ("MNIST", "MNIST/raw", 10, "none"),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw", 10, "none"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 10, "crop-flip"),
    "cifar100": ("CIFAR100", "cifar-100-python", 100, "crop-flip"),
}


def data_root(root: str | None) -> Path:
    return Path(root or os.environ.get("LCTRUN_DATA") or "data").expanduser()


def _as_nchw(data) -> torch.Tensor:
    x = torch.as_tensor(data)
    if x.dim() == 3:  # (N, H, W) grey
        return x[:, None].contiguous()
    return x.permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)


def _reason(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {getattr(e, 'reason', None) or e}".split())[:200]


def unreadable(name: str, folder: Path, e: BaseException) -> str:
    """A dataset whose files exist but cannot be read: truncated, empty, or not in the expected format."""
    return (
        f"dataset '{name}' under {folder} is damaged or incomplete ({_reason(e)}): replace its files with "
        "good copies (their sizes and checksums are in the data folder's MD5SUMS, if it has one)"
    )


def load_vision(name: str, root: str | None, download: bool) -> DataBundle:
    import torchvision.datasets as tvd

    cls_name, folder, classes, augment = VISION[name]
    path = data_root(root)
    cls = getattr(tvd, cls_name)
    try:
        train = cls(str(path), train=True, download=download)
        test = cls(str(path), train=False, download=download)
    except RuntimeError as e:
        if "not found" in str(e).lower() or "corrupted" in str(e).lower():
            raise DataNotFoundError(
                f"dataset '{name}' not found under {path / folder}: set LCTRUN_DATA or data.root to the folder that "
                f"holds {folder.split('/')[0]}/, or add data.download=true to fetch it (needs internet)"
            ) from None
        raise DataNotFoundError(unreadable(name, path / folder, e)) from None
    except OSError as e:  # urllib's URLError among them: no network, or the download was refused
        if download:
            raise DataNotFoundError(
                f"dataset '{name}': data.download=true could not fetch it into {path} ({_reason(e)}); without "
                f"internet, copy its files to {path / folder} (torchvision's layout) and drop data.download"
            ) from None
        raise DataNotFoundError(unreadable(name, path / folder, e)) from None
    except (ValueError, AssertionError, EOFError, IndexError, KeyError, TypeError) as e:  # damaged files
        raise DataNotFoundError(unreadable(name, path / folder, e)) from None
    train_x, test_x = _as_nchw(train.data), _as_nchw(test.data)
    mean, std = channel_stats(train_x)
    return DataBundle(
        name=name,
        train_x=train_x,
        train_y=torch.as_tensor(train.targets, dtype=torch.long),
        test_x=test_x,
        test_y=torch.as_tensor(test.targets, dtype=torch.long),
        num_classes=classes,
        mean=mean,
        std=std,
        augment=augment,
    )
