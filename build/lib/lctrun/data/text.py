"""Sequence datasets: sequential MNIST (row by row) and a word-level corpus in Penn Treebank format.

seqmnist is the MNIST bundle itself: the `lstm-seq` model reads each 28x28 image as 28 steps of
28 features, so the data needs no change.

ptb reads `<root>/ptb/ptb.train.txt` and `ptb.test.txt` (one sentence per line, words separated by
spaces; `<eos>` is appended at every line end). The vocabulary is the training file's words in order
of first appearance; test words outside it become `<unk>` (added to the vocabulary only if needed;
the PTB files already contain it). `ptb.valid.txt` is used as the test split only when
`ptb.test.txt` is missing; otherwise it is unused. Each split's token stream is cut into
non-overlapping windows of `seq_len` tokens: x = tokens[i*T : (i+1)*T], y = the same window shifted
by one token. Windows are independent samples (the model's state starts at zero for every batch),
so they can be shuffled. Nothing is downloaded: the files must be supplied by the user.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lctrun.data.bundle import DataBundle
from lctrun.data.vision import data_root, load_vision
from lctrun.errors import ConfigError, DataNotFoundError

UNK, EOS = "<unk>", "<eos>"


def load_seqmnist(root: str | None, download: bool) -> DataBundle:
    bundle = load_vision("mnist", root, download)
    bundle.name = "seqmnist"
    return bundle


def read_words(path: Path) -> list[str]:
    words: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            words += line.split() + [EOS]
    return words


def ptb_files(root: str | None) -> tuple[Path, Path]:
    """(train file, test file) under <root>/ptb, or DataNotFoundError naming what was looked for."""
    folder = data_root(root) / "ptb"
    train = folder / "ptb.train.txt"
    test = next((p for p in (folder / "ptb.test.txt", folder / "ptb.valid.txt") if p.is_file()), None)
    if not train.is_file() or test is None:
        missing = train if not train.is_file() else folder / "ptb.test.txt"
        raise DataNotFoundError(
            f"dataset 'ptb' not found: {missing} does not exist. Supply the Penn Treebank files yourself "
            f"(ptb.train.txt and ptb.test.txt, or ptb.valid.txt, one sentence per line) in {folder}, and set "
            f"LCTRUN_DATA or data.root to {folder.parent}; lctrun does not download them"
        )
    return train, test


def load_corpus(root: str | None) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(vocabulary, train token ids, test token ids) of the PTB-format corpus under <root>/ptb."""
    train_path, test_path = ptb_files(root)
    train_words, test_words = read_words(train_path), read_words(test_path)
    index: dict[str, int] = {}
    for w in train_words:
        index.setdefault(w, len(index))
    if any(w not in index for w in test_words):
        index.setdefault(UNK, len(index))
    unk = index.get(UNK)
    train_ids = torch.tensor([index[w] for w in train_words], dtype=torch.long)
    test_ids = torch.tensor([index.get(w, unk) for w in test_words], dtype=torch.long)
    return list(index), train_ids, test_ids


def windows(ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (N, T) input windows and their next-token targets."""
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ConfigError(f"a corpus split has {len(ids)} tokens, fewer than data.seq_len + 1 = {seq_len + 1}")
    x = ids[: n * seq_len].view(n, seq_len).clone()
    y = ids[1 : n * seq_len + 1].view(n, seq_len).clone()
    return x, y


def load_ptb(root: str | None, seq_len: int) -> DataBundle:
    vocab, train_ids, test_ids = load_corpus(root)
    train_x, train_y = windows(train_ids, seq_len)
    test_x, test_y = windows(test_ids, seq_len)
    return DataBundle(
        name="ptb",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=len(vocab),
        mean=torch.zeros(0),  # token ids are never normalised (the loader normalises only images)
        std=torch.ones(0),
        augment="none",
    )
