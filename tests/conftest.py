import os
import signal
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# a shell starts a background job (`pytest &`, nohup) with Ctrl-C ignored, and that carries into every child: the
# tests that press Ctrl-C would see nothing happen. They press it as a terminal would, so take it as one does.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def mnist_root() -> Path | None:
    root = os.environ.get("LCTRUN_DATA")
    if root and (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").exists():
        return Path(root)
    return None


@pytest.fixture
def data_root() -> Path:
    """The offline MNIST/Fashion-MNIST folder. In CI it must be there: a missing one fails, never skips."""
    root = mnist_root()
    if root is None:
        if os.environ.get("CI"):
            pytest.fail("LCTRUN_DATA does not point at the MNIST files (CI sets it to ../shared/data)")
        pytest.skip("set LCTRUN_DATA to the folder holding MNIST/raw to run the real-data tests")
    return root
