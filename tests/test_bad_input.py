"""Property-based: any config override or experiment YAML either loads or fails with one clear line
(a ConfigError), never another exception; and a `train` that fails on bad input leaves no run directory."""

import contextlib
import io
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lctrun.cli import main
from lctrun.config import ConfigError, Experiment, load_experiment, to_dict
from lctrun.launch import flatten
from lctrun.reporting.rundir import read_rows

# Every run explores the same examples, locally as in CI (no failure that only one of them sees);
# LCTRUN_HYPOTHESIS_EXPLORE=1 draws new ones, to look for more.
settings.register_profile("fixed", derandomize=True, deadline=None, database=None)
settings.register_profile("explore", deadline=None)
settings.load_profile("explore" if os.environ.get("LCTRUN_HYPOTHESIS_EXPLORE") else "fixed")

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "mnist-cnn.yaml"
KEYS = sorted(flatten(to_dict(Experiment())))
SECTIONS = sorted({k.split(".")[0] for k in KEYS if "." in k})
key = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(SECTIONS),
    st.sampled_from(KEYS).map(lambda k: k + "x"),
    st.text(st.characters(codec="ascii", exclude_characters="="), max_size=12),
)
scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**9), 10**9),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["mnist", "fake", "cnn-small", "resnet8", "lct", "bp", "al", "cpu", "cuda:7", "[conv2]"]),
)
value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(key, inner, max_size=3))
raw = st.one_of(
    value.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip().replace("\n...", "")),
    st.text(max_size=20),
    st.sampled_from(["[", "{a: 1", "'", "!!python/object/apply:os.system [ls]", "*x", "1e400", "- 1", "?"]),
)
override = st.one_of(st.builds(lambda k, v: f"{k}={v}", key, raw), st.text(max_size=20))


def assert_clear(error: Exception) -> None:
    assert isinstance(error, ConfigError), f"{type(error).__name__}: {error}"
    message = str(error)
    assert message and "\n" not in message and "Traceback" not in message


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(override, max_size=4))
def test_any_override_loads_or_is_one_clear_line(overrides):
    try:
        cfg = load_experiment(None, overrides)
    except ConfigError as e:
        assert_clear(e)
    except Exception as e:  # noqa: BLE001 - the property: nothing else ever escapes
        raise AssertionError(f"{overrides!r} raised {type(e).__name__}: {e}") from e
    else:
        assert isinstance(cfg, Experiment)


document = st.one_of(
    st.dictionaries(key, value, max_size=5).map(lambda d: yaml.safe_dump(d)),
    st.dictionaries(st.sampled_from(SECTIONS), st.dictionaries(key, value, max_size=3), max_size=3).map(yaml.safe_dump),
    value.map(yaml.safe_dump),
    st.text(max_size=60),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(document)
def test_any_experiment_file_loads_or_is_one_clear_line(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    try:
        load_experiment(path)
    except ConfigError as e:
        assert_clear(e)


# Inputs that pass loading but may fail when the run is built (models, cuts, devices, data).
TINY = ["data.name=fake", "data.shape=[1,16,16]", "data.train_size=32", "data.test_size=16", "data.batch_size=16"]
late = st.one_of(
    st.sampled_from(["model.name=cnn-small", "model.name=resnet8", "model.name=wrn-10-1", "model.name=wrn-3-x"]),
    st.sampled_from(["method=bp", "method=lct", "method=dni", "method=penalty", "method=al"]),
    st.lists(st.sampled_from(["conv1", "conv2", "fc1", "layer1", "layer2", "stem", "nope", ""]), max_size=3).map(
        lambda cut: f"model.split=[{','.join(cut)}]"
    ),
    st.integers(-1, 9).map(lambda k: f"model.groups={k}"),
    st.sampled_from(["devices=[cpu]", "devices=[cpu,cpu]", "devices=[cuda]", "devices=[tpu]", "devices=[]"]),
    st.sampled_from(["data.name=mnits", "data.root=/nonexistent", "data.shape=[1,2,2]", "data.shape=[3]"]),
    st.sampled_from(["layerpar.downsample=4", "critic.convs=[1,2,3,4,5,6]", "model.balance=time", "workers=3"]),
    st.sampled_from(["runtime=distributed", "runtime=distributed", "pipeline_depth=0", "pipeline_depth=3"]),
)


def run_cli(args: list[str]) -> tuple[int, str]:
    """`lctrun ARGS` through the real entry point, in this process: (exit code, stderr)."""
    err = io.StringIO()
    argv = sys.argv
    sys.argv = ["lctrun", *args]
    try:
        with contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return code, err.getvalue()


@settings(max_examples=18, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(late, min_size=1, max_size=4))
def test_train_fails_cleanly_and_leaves_no_run_directory(tmp_path_factory, overrides):
    """Exit 0 with a metrics file, or exit 2 with one line on stderr and no run directory: never a traceback."""
    out = tmp_path_factory.mktemp("run") / "run"
    code, err = run_cli(["train", str(EXPERIMENT), *TINY, "epochs=1", *overrides, "--out", str(out)])
    if code == 0:
        assert (out / "metrics.csv").exists()
        return
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), f"{overrides!r}: exit {code}: {err}"
    assert not out.exists(), f"{overrides!r} failed ({err.strip()}) but left {sorted(p.name for p in out.iterdir())}"


def one_line_error(args: list[str], out: Path, env: dict | None = None) -> str:
    """Run `lctrun ARGS --out OUT` in process; it must exit 2 with one line on stderr and leave no run dir."""
    old = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        code, err = run_cli([*args, "--out", str(out)])
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), f"exit {code}: {err}"
    assert not (out.exists() and out.is_dir() and any(out.iterdir())), f"left {out}"
    return lines[0]


def damaged_copy(tmp_path: Path, damage) -> Path:
    """A data root whose MNIST files are links to the real ones, except the test images, damaged by `damage`."""
    real = Path(os.environ.get("LCTRUN_DATA", "../shared/data")) / "MNIST" / "raw"
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in real.iterdir():
        if not f.name.endswith(".gz"):
            (raw / f.name).symlink_to(f.resolve())
    target = raw / "t10k-images-idx3-ubyte"
    data = target.read_bytes()
    target.unlink()
    target.write_bytes(damage(data))
    return tmp_path / "data"


@pytest.mark.parametrize(
    "damage",
    [lambda b: b[: len(b) // 2], lambda b: b"", lambda b: b"\x00\x00\x09\x09" + b[4:]],
    ids=["truncated", "empty", "bad-magic"],
)
def test_a_damaged_dataset_is_one_line_naming_its_folder(tmp_path, damage):
    root = damaged_copy(tmp_path, damage)
    args = ["train", str(EXPERIMENT), *TINY, "data.name=mnist", "epochs=1"]
    line = one_line_error(args, tmp_path / "run", {"LCTRUN_DATA": str(root)})
    assert f"under {root / 'MNIST' / 'raw'} is damaged or incomplete" in line


def test_a_download_without_network_is_one_line(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    args = ["train", str(EXPERIMENT), *TINY, "data.name=cifar10", "data.download=true", "epochs=1"]
    line = one_line_error(args, tmp_path / "run", {"LCTRUN_DATA": str(tmp_path / "empty")})
    assert "data.download=true could not fetch it" in line and "without internet, copy its files" in line


@pytest.mark.parametrize("where", ["file", "under-a-file", "/proc", "/sys"])
def test_an_output_path_that_cannot_hold_a_run_is_one_line(tmp_path, where):
    (tmp_path / "afile").write_text("x")
    out = {"file": tmp_path / "afile", "under-a-file": tmp_path / "afile" / "run"}.get(where, Path(f"{where}/lctrun-x"))
    line = one_line_error(["train", str(EXPERIMENT), *TINY, "epochs=1"], out)
    assert f"--out {out}" in line
    assert (tmp_path / "afile").read_text() == "x"  # nothing overwritten


def test_more_groups_than_blocks_is_refused_before_workers_start(tmp_path):
    import time

    start = time.time()
    line = one_line_error(["train", str(EXPERIMENT), *TINY, "model.groups=20", "runtime=distributed"], tmp_path / "r")
    assert "model.groups=20 but cnn-small has only 5 blocks" in line and time.time() - start < 20


@pytest.mark.parametrize("edit", [("- conv2", "- conv1"), ("method: lct", "method: dgl")], ids=["split", "method"])
def test_resuming_after_config_yaml_was_edited_is_one_line(tmp_path, edit):
    out = tmp_path / "run"
    code, _ = run_cli(
        ["train", str(EXPERIMENT), *TINY, "epochs=1", "method=lct", "model.split=[conv2]", "--out", str(out)]
    )
    assert code == 0
    config = out / "config.yaml"
    config.write_text(config.read_text().replace(*edit))
    code, err = run_cli(["train", "--resume", str(out), "epochs=2"])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "was config.yaml edited after the run started" in lines[0], err


@pytest.mark.parametrize(
    "name",
    ["../../../escaped", "a/b", '"with\\nnewline"', "' spaced'", "con", ".hidden", "ends.", "x" * 65, "a\\b", "a:b"],
)
def test_a_run_name_that_is_not_one_safe_path_component_is_refused(tmp_path, monkeypatch, name):
    """The name goes into the default run directory's path: anything but one safe component is refused in one
    line, before any directory is made (none here, nor next to or above it)."""
    monkeypatch.chdir(tmp_path / "..")
    before = set(Path.cwd().iterdir())
    code, err = run_cli(["train", str(EXPERIMENT), *TINY, "epochs=1", f"name={name}"])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "cannot name a run directory" in lines[0], err
    assert set(Path.cwd().iterdir()) == before and not list(tmp_path.iterdir())


def test_a_safe_run_name_names_the_default_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["train", str(EXPERIMENT), *TINY, "epochs=1", "name=my_run.v2"])
    assert code == 0, err
    (run,) = (tmp_path / "results" / "runs").iterdir()
    assert run.name.endswith("-my_run.v2-bp") and (run / "metrics.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_resuming_after_the_learning_rate_was_edited_in_config_yaml_is_one_line(tmp_path):
    """The checkpoint carries the config it was trained with: an edit that leaves every shape as it was
    (optim.lr) is refused too, naming the key and both values; an edit of the run's length is not."""
    out = tmp_path / "run"
    code, err = run_cli(["train", str(EXPERIMENT), *TINY, "epochs=1", "optim.lr=0.05", "--out", str(out)])
    assert code == 0, err
    config = out / "config.yaml"
    trained = config.read_text()
    config.write_text(trained.replace("lr: 0.05", "lr: 0.1"))
    code, err = run_cli(["train", "--resume", str(out), "epochs=2"])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "optim.lr=0.05 in its checkpoint but 0.1 now" in lines[0] and "was config.yaml edited" in lines[0]
    assert [r["epoch"] for r in read_rows(out / "metrics.csv")] == [1]  # nothing trained, nothing lost
    config.write_text(trained.replace("\nepochs: 1\n", "\nepochs: 2\n"))  # a longer run: allowed
    code, err = run_cli(["train", "--resume", str(out)])
    assert code == 0, err
    assert [r["epoch"] for r in read_rows(out / "metrics.csv")] == [1, 2]
