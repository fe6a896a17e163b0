import pytest

from lctrun.config import Experiment, load_experiment
from lctrun.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, "method: bp\ndata:\n  name: mnist\noptim:\n  lr: 1\n")
    cfg = load_experiment(path, ["optim.lr=0.05", "data.train_size=5000", "epochs=2", "seed=1", "model.split=conv2"])
    assert cfg.name == "exp"
    assert cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float)
    assert cfg.data.train_size == 5000 and cfg.epochs == 2 and cfg.seed == 1
    assert cfg.model.split == ["conv2"]
    assert isinstance(load_experiment(path).optim.lr, float)  # an int where a float is expected is accepted


def test_defaults_without_a_file():
    assert load_experiment(None) == Experiment()


@pytest.mark.parametrize(
    "override, words",
    [
        ("optim.lrr=0.1", ["unknown config key 'optim.lrr'", "optim.lr"]),
        ("epoch=2", ["unknown config key 'epoch'", "epochs"]),
        ("optm.lr=0.1", ["unknown config key 'optm'", "optim"]),
        ("epochs=two", ["epochs", "expected int", "'two'"]),
        ("optim.lr=fast", ["optim.lr", "expected float"]),
        ("data.augment=maybe", ["data.augment='maybe'", "crop-flip"]),
        ("layerpar.downsample=3", ["layerpar.downsample=3", "1, 2, 4"]),
        ("layerpar.cycles=2", ["layerpar.cycles", "layerpar.sph=true"]),
        ("layerpar.beta_growth=0.5", ["layerpar.beta_growth", ">= 1"]),
        ("model.split={a: 1}", ["model.split", "expected a list"]),
        ("epochs=0", ["epochs must be >= 1"]),
        ("optim.schedule=linear", ["optim.schedule", "multistep"]),
        ("runtime=cluster", ["runtime", "distributed"]),
        ("epochs", ["not KEY=VALUE"]),
        ("epochs.x=1", ["'epochs' is not a section"]),
    ],
)
def test_bad_overrides_name_the_problem(override, words):
    with pytest.raises(ConfigError) as e:
        load_experiment(None, [override])
    message = str(e.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_sph_cycles_must_match_the_epochs():
    with pytest.raises(ConfigError, match=r"layerpar.cycles=3 with 2\+1 epochs per cycle needs epochs=9, got epochs=4"):
        load_experiment(None, ["epochs=4", "layerpar.sph=true", "layerpar.parallel_epochs=2", "layerpar.cycles=3"])
    assert load_experiment(None, ["epochs=9", "layerpar.sph=true", "layerpar.parallel_epochs=2", "layerpar.cycles=3"])


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["pipeline.microbatches=0"], ["pipeline.microbatches must be >= 1"]),
        (["pipeline.microbatches=256"], ["pipeline.microbatches=256 must divide data.batch_size=128"]),
        (["pipeline.microbatches=5"], ["must divide data.batch_size=128", "pipeline.microbatches=4"]),
        (["pipeline.schedule=zb"], ["pipeline.schedule='zb'", "gpipe, 1f1b"]),
        (["pipeline.schedule=gpipe"], ["runtime=distributed"]),
        (["method=lct", "pipeline.microbatches=4"], ["use method=bp", "method=lct"]),
        (["runtime=distributed", "pipeline.microbatches=4"], ["add pipeline.schedule=gpipe"]),
        (
            [
                "runtime=distributed",
                "model.split=[conv1,conv2,conv3]",
                "pipeline.schedule=1f1b",
                "pipeline.microbatches=2",
            ],
            ["1f1b", "pipeline.microbatches=2 < 4 groups", "gpipe"],
        ),
    ],
)
def test_bad_micro_batches_name_the_fix(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_experiment(None, overrides)
    assert "\n" not in str(e.value) and all(word in str(e.value) for word in words)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="experiment file not found"):
        load_experiment(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_experiment(write(tmp_path, "data: [\n"))
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_experiment(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="unknown config key 'data.nmae'"):
        load_experiment(write(tmp_path, "data:\n  nmae: mnist\n"))


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=nan", "optim.lr"),
        ("optim.lr=inf", "optim.lr"),
        ("optim.momentum=-0.5", "optim.momentum"),
        ("optim.momentum=1", "optim.momentum"),
        ("optim.weight_decay=-1e-4", "optim.weight_decay"),
        ("critic.lr=0", "critic.lr"),
        ("critic.lr=.inf", "critic.lr"),
        ("critic.weight_decay=-1", "critic.weight_decay"),
        ("data.num_classes=0", "data.num_classes"),
        ("layerpar.beta=nan", "layerpar.beta"),
        ("layerpar.beta_growth=inf", "layerpar.beta_growth"),
    ],
)
def test_numbers_out_of_range_or_not_finite_are_refused_before_anything_runs(override, key):
    with pytest.raises(ConfigError, match=rf"^{key} must be"):
        load_experiment(None, [override])


def test_empty_and_binary_experiment_files_are_clear_errors(tmp_path):
    empty, binary = tmp_path / "empty.yaml", tmp_path / "binary.yaml"
    empty.write_text("# nothing but a comment\n")
    binary.write_bytes(b"\xff\xfe\x00method: lct\x80")
    with pytest.raises(ConfigError, match="is empty"):
        load_experiment(empty)
    with pytest.raises(ConfigError, match="not a text file"):
        load_experiment(binary)
