"""Property-based: any config override or experiment YAML either loads or fails with one clear line
(a ConfigError), never another exception; and a `train` that fails on bad input leaves no run directory."""

import contextlib
import io
import os
import signal
import sys
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lctrun.cli import main
from lctrun.config import ConfigError, Experiment, load_experiment, to_dict
from lctrun.launch import flatten

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
