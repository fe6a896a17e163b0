"""LSTM models (sequential MNIST, word-level LM) cut into groups, the PTB-format corpus, and lct on both."""

import random
from pathlib import Path

import pytest
import torch

from lctrun.config import DataConfig, load_experiment
from lctrun.data import load_data
from lctrun.data.text import EOS, UNK, load_corpus
from lctrun.errors import DataNotFoundError
from lctrun.methods import group_shapes
from lctrun.models import build_model, split_groups
from lctrun.prepared import make_loaders, make_serial_runtime, prepare
from lctrun.train import train

SUBJECTS = ["the cat", "the dog", "a bird"]
VERBS = ["sat on", "ran to", "looked at"]
OBJECTS = ["the mat", "the park", "a tree"]
WORDS = {w for phrase in SUBJECTS + VERBS + OBJECTS for w in phrase.split()} | {EOS}


def write_corpus(root: Path, train_sentences: int = 120, test_sentences: int = 30, test_extra: str = "") -> Path:
    """A tiny corpus in PTB format: random simple sentences (about 7 words each) of a 15-word vocabulary."""
    rng = random.Random(0)

    def sentence() -> str:
        return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"

    folder = root / "ptb"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ptb.train.txt").write_text("\n".join(sentence() for _ in range(train_sentences)) + "\n")
    test = [sentence() for _ in range(test_sentences)]
    (folder / "ptb.test.txt").write_text("\n".join(test) + "\n" + test_extra)
    return root


@pytest.mark.parametrize(
    "name, in_shape, num_classes",
    [("lstm-seq", (1, 28, 28), 10), ("lstm-lm", (12,), 50)],
)
@pytest.mark.parametrize("split", [["lstm.0"], ["embed", "lstm.1"]])
def test_groups_compose_to_the_whole_model(name, in_shape, num_classes, split):
    torch.manual_seed(0)
    model = build_model(name, num_classes, in_shape).eval()
    if name == "lstm-lm":
        x = torch.randint(0, num_classes, (3, *in_shape))
    else:
        x = torch.randn(3, *in_shape)
    groups = split_groups(model, split)
    assert len(groups) == len(split) + 1
    with torch.no_grad():
        expected = model(x)
        h = x
        for g in groups:
            h = g(h)
    torch.testing.assert_close(h, expected)
    seq = in_shape[0] if name == "lstm-lm" else in_shape[1]
    assert expected.shape == ((3, seq, num_classes) if name == "lstm-lm" else (3, num_classes))
    # the dry run of the methods feeds float zeros, also to the token model
    shapes = group_shapes(groups, in_shape)
    assert shapes[0][0] == in_shape and shapes[-1][1] == tuple(expected.shape[1:])


def test_lm_reads_float_token_ids_like_long_ones():
    model = build_model("lstm-lm", 30, (8,)).eval()
    x = torch.randint(0, 30, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(x.float()), model(x))


def test_ptb_corpus_loads_as_shifted_windows(tmp_path):
    root = write_corpus(tmp_path)
    vocab, train_ids, test_ids = load_corpus(str(root))
    assert set(vocab) == WORDS and len(vocab) == 15
    first_line = (root / "ptb" / "ptb.train.txt").read_text().splitlines()[0].split() + [EOS]
    assert [vocab[i] for i in train_ids[: len(first_line)]] == first_line

    seq_len = 10
    data = load_data(DataConfig(name="ptb", root=str(root), seq_len=seq_len, augment=False), seed=0)
    assert data.num_classes == 15
    n = (len(train_ids) - 1) // seq_len
    assert data.train_x.shape == data.train_y.shape == (n, seq_len)
    assert data.train_x.dtype == data.train_y.dtype == torch.long
    assert data.in_shape == (seq_len,)
    assert torch.equal(data.train_y[:, :-1], data.train_x[:, 1:])  # next-token targets
    assert torch.equal(data.train_y[:-1, -1], data.train_x[1:, 0])  # the windows tile the stream
    assert torch.equal(data.train_x.flatten(), train_ids[: n * seq_len])
    assert data.test_x.shape[1] == seq_len and torch.equal(data.test_x.flatten(), test_ids[: data.test_x.numel()])

    cfg = load_experiment(None, ["data.name=ptb", f"data.root={root}", f"data.seq_len={seq_len}", "model.name=lstm-lm"])
    train_loader, _ = make_loaders(prepare(cfg), torch.device("cpu"))
    batch = next(iter(train_loader))
    assert torch.equal(batch.x.long(), data.train_x[batch.idx])  # ids pass the loader unnormalised


def test_unknown_test_words_become_unk(tmp_path):
    root = write_corpus(tmp_path, test_extra="the fish sat on the mat\n")
    vocab, _, test_ids = load_corpus(str(root))
    assert vocab[-1] == UNK and len(vocab) == 16
    assert vocab[test_ids[-6]] == UNK  # "fish" in: the fish sat on the mat <eos>


def test_missing_corpus_says_what_to_supply(tmp_path):
    with pytest.raises(DataNotFoundError, match="ptb.train.txt") as err:
        load_data(DataConfig(name="ptb", root=str(tmp_path)), seed=0)
    assert str(tmp_path / "ptb") in str(err.value) and "Supply" in str(err.value)


def test_lct_trains_a_two_group_language_model(tmp_path):
    root = write_corpus(tmp_path / "data")
    cfg = load_experiment(
        "experiments/ptb-lstm.yaml",
        [
            f"data.root={root}",
            "method=lct",
            "threads_per_worker=1",  # small LSTM steps: a second thread costs more than it gives
            "epochs=2",
            "data.seq_len=10",
            "data.batch_size=8",
            "data.test_size=null",
            "optim.lr=0.01",
            "optim.schedule=none",
            "critic.lr=0.01",
        ],
    )
    p = prepare(cfg)
    assert [g.block_names for g in p.groups] == [["embed", "lstm.0"], ["lstm.1", "head"]]
    runtime = make_serial_runtime(p)
    result = train(cfg, run_dir=tmp_path / "run", prepared=p, runtime=runtime)
    vocab = p.data.num_classes
    final = result.final
    assert final["test_ppl"] < vocab / 2, final
    assert final["g1_test_ppl"] < vocab / 2, final  # the sub-model (group 1 + its critic) is a LM too
    assert result.rows[-1]["test_loss"] < result.rows[0]["test_loss"] + 0.05

    x = p.data.test_x[:4].float()
    h, critic_logits = runtime.stages[0].eval_forward(x)
    assert h.shape == (4, 10, 200)
    assert critic_logits.shape == (4, 10, vocab)  # per token, linear to the vocabulary
    assert isinstance(runtime.stages[0].aux[-1], torch.nn.Linear) and len(runtime.stages[0].aux) == 1


@pytest.mark.slow
def test_lct_learns_sequential_mnist(tmp_path, data_root):
    cfg = load_experiment(
        "experiments/seqmnist-lstm.yaml",
        [
            f"data.root={data_root}",
            "method=lct",
            "threads_per_worker=1",  # small LSTM steps: a second thread costs more than it gives
            "epochs=1",
            "data.train_size=2000",
            "data.test_size=500",
            "data.batch_size=64",
            "optim.lr=5e-3",
            "critic.lr=5e-3",
        ],
    )
    result = train(cfg, run_dir=tmp_path)
    assert result.final["test_acc"] >= 40.0, result.final
    assert result.final["g1_test_acc"] >= 30.0, result.final
