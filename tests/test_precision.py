"""Mixed precision and channels-last (lctrun/precision.py): autocast really on, messages in the compute dtype,
fp32 master weights and optimiser state, layouts kept, and the serial and distributed runtimes still agreeing."""

import pytest
import torch

from lctrun.config import load_experiment
from lctrun.data import TensorLoader
from lctrun.errors import ConfigError
from lctrun.launch import run_training
from lctrun.methods import EpochPlan
from lctrun.precision import check_precision
from lctrun.prepared import begin_epoch, make_loaders, make_serial_runtime, prepare
from lctrun.reporting.rundir import read_rows

TINY = [
    "data.name=fake",
    "data.shape=[3,16,16]",
    "data.train_size=64",
    "data.test_size=32",
    "data.batch_size=16",
    "model.name=cnn-small",
    "optim.lr=0.05",
    "critic.lr=0.01",
    "critic.channels=8",
    "model.split=[conv2]",
    "epochs=1",
]
METHODS = ["bp", "lct", "dgl", "dni", "penalty", "al"]


def serial_epoch(overrides):
    """A prepared serial run after one training epoch, with every stage's train_step inputs and feedback recorded
    (dtype, layout) and every module output's dtype."""
    p = prepare(load_experiment(None, TINY + overrides))
    runtime = make_serial_runtime(p)
    seen = {"inputs": [], "feedback": [], "outputs": {}}

    def record(key, out):  # a forward hook that returns nothing keeps the output
        seen["outputs"].setdefault(key, out.dtype)

    for k, stage in enumerate(runtime.stages):
        step, feedback = stage.train_step, stage.feedback

        def recording_step(x, y, idx, k=k, step=step):
            seen["inputs"].append((k, None if x is None else x.dtype))
            return step(x, y, idx)

        def recording_feedback(msg, k=k, feedback=feedback):
            seen["feedback"].append((k, msg.dtype))
            return feedback(msg)

        stage.train_step, stage.feedback = recording_step, recording_feedback
        for name, module in (("group", stage.group), ("aux", stage.aux)):
            if module is not None:
                module.register_forward_hook(lambda m, args, out, key=(k, name): record(key, out))
    train, _ = make_loaders(p, "cpu")
    begin_epoch(p, runtime, 1, train)
    runtime.train_epoch(train)
    return p, runtime, seen


@pytest.mark.parametrize("method", METHODS)
def test_autocast_is_on_under_bf16(method):
    """Every group's forward (and every critic's, head's, synthesizer's) computes in bf16: fails if autocast is
    silently off. At fp32 the same outputs are fp32."""
    _, _, seen = serial_epoch([f"method={method}", "precision=bf16"])
    assert seen["outputs"] and all(dtype == torch.bfloat16 for dtype in seen["outputs"].values()), seen["outputs"]
    _, _, seen = serial_epoch([f"method={method}"])
    assert all(dtype == torch.float32 for dtype in seen["outputs"].values())


@pytest.mark.parametrize("method", METHODS)
def test_messages_cross_the_cut_in_the_compute_dtype(method):
    """Under bf16 the activations group 2 receives, and the gradients group 1 receives (bp, dni, the serial phase
    of penalty/al), are bf16; lct's loss message and penalty/al's targets stay fp32, as their rules compare them.
    Group 1 reads the data as loaded (fp32)."""
    _, runtime, seen = serial_epoch([f"method={method}", "precision=bf16"])
    inputs = dict(seen["inputs"])
    assert inputs[0] == torch.float32
    if method in ("penalty", "al"):  # the parallel phase: group 2 reads its input from lambda (fp32)
        assert inputs[1] is None
    else:
        assert inputs[1] == torch.bfloat16
    feedback = {dtype for _, dtype in seen["feedback"]}
    expected = {"bp": {torch.bfloat16}, "dni": {torch.bfloat16}, "lct": {torch.float32}, "dgl": set()}
    assert feedback == expected.get(method, {torch.float32})
    assert runtime.stages[1].wire.dtype == torch.bfloat16


def test_penalty_and_al_wires_per_phase():
    """The serial phase is model-parallel bp (bf16 both ways); the parallel phase sends phi forward in bf16 and
    the target lambda + mu / beta back in fp32."""
    p = prepare(load_experiment(None, TINY + ["method=al", "precision=bf16"]))
    stage = make_serial_runtime(p).stages[0]
    stage.begin_epoch(EpochPlan("serial"))
    assert (stage.wire.dtype, stage.wire.feedback_dtype) == (torch.bfloat16, torch.bfloat16)
    stage.begin_epoch(EpochPlan("parallel", beta=0.1))
    assert (stage.wire.dtype, stage.wire.feedback_dtype) == (torch.bfloat16, torch.float32)


@pytest.mark.parametrize("method", ["bp", "lct", "dni", "al"])
def test_master_weights_and_optimiser_state_stay_fp32(method):
    """Autocast casts per op: the parameters, their gradients and every optimiser's state remain fp32."""
    _, runtime, _ = serial_epoch([f"method={method}", "precision=bf16", "optim.momentum=0.9"])
    for stage in runtime.stages:
        for module in stage.modules():
            for q in module.parameters():
                assert q.dtype == torch.float32
                assert q.grad is None or q.grad.dtype == torch.float32
        for opt in [stage.opt, getattr(stage, "aux_opt", None)]:
            if opt is None:
                continue
            states = [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]
            assert states and all(v.dtype == torch.float32 for v in states if v.is_floating_point())
        for tensor in stage.state_tensors():  # lambda, mu, phi: at layerpar.storage (fp32 by default)
            assert tensor.dtype == torch.float32


def test_channels_last_model_and_batches():
    """memory_format=channels_last: conv weights (groups and critics) and every batch are NHWC, set once."""
    p, runtime, _ = serial_epoch(["method=lct", "memory_format=channels_last", "precision=bf16"])
    convs = [m for s in runtime.stages for mod in s.modules() for m in mod.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) >= 3 and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    train, test = make_loaders(p, "cpu")
    train.augment = "crop-flip"
    for loader in (train, test):
        batch = next(iter(loader))
        assert batch.x.is_contiguous(memory_format=torch.channels_last) and not batch.x.is_contiguous()


def test_channels_last_batches_hold_the_same_values():
    """The loader's crop, flip and normalisation give the same numbers in either layout."""
    x = torch.randint(0, 255, (40, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(40)
    kw = dict(shuffle=True, mean=torch.tensor([0.5, 0.4, 0.3]), std=torch.tensor([0.2, 0.3, 0.4]), augment="crop-flip")
    plain = list(TensorLoader(x, y, 16, **kw))
    nhwc = list(TensorLoader(x, y, 16, memory_format="channels_last", **kw))
    for a, b in zip(plain, nhwc, strict=True):
        assert torch.equal(a.x, b.x) and b.x.is_contiguous(memory_format=torch.channels_last)


def test_old_layerpar_precision_key_still_sets_the_storage():
    cfg = load_experiment(None, ["layerpar.precision=bf16"])
    assert cfg.layerpar.storage == "bf16" and cfg.precision == "fp32"


def test_fp16_on_a_cpu_without_native_fp16_is_refused(monkeypatch):
    import lctrun.precision

    monkeypatch.setattr(lctrun.precision, "cpu_has_native_fp16", lambda: False)
    with pytest.raises(ConfigError, match="precision=fp16 on this CPU.*use precision=bf16"):
        load_experiment(None, ["precision=fp16"])


def test_channels_last_needs_image_data():
    """Token sequences (ptb: one sample is (T,)) have no channels to put last; images with one channel pass."""
    with pytest.raises(ConfigError, match="memory_format=channels_last is for image data"):
        check_precision("fp32", "channels_last", ["cpu"], input_dims=1)
    check_precision("bf16", "channels_last", ["cpu"], input_dims=3)


# -- the distributed runtime (worker processes) ----------------------------------------------------------------
def group_params(run_dir):
    out = []
    for path in sorted(run_dir.glob("ckpt-e*.pt")):
        for stage in torch.load(path, weights_only=False)["runtime"]["stages"]:
            out += [v.float() for v in stage["group"].values()] + [v.float() for v in stage.get("aux", {}).values()]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bp", "lct", "dni", "bp pipeline.schedule=gpipe pipeline.microbatches=4"])
def test_distributed_equals_serial_at_bf16_channels_last(tmp_path, method):
    """At depth 1 the worker processes compute what one process does. One thread on both sides: the same kernels
    on the same bf16 inputs in the same order, so the parameters agree to fp32 rounding (atol 1e-6), not merely to
    bf16's 3 significant digits; a message at fp32, or a missing cast on one side, moves them by far more (1e-3)."""
    method, *extra = method.split()
    if extra:  # micro-batches in one process give the update of the schedule across workers
        serial_extra = [e for e in extra if not e.startswith("pipeline.schedule")]
    else:
        serial_extra = []
    base = TINY + [f"method={method}", "precision=bf16", "memory_format=channels_last", "threads_per_worker=1"]
    base += ["epochs=2", "data.augment=crop-flip"]
    serial = run_training(load_experiment(None, base + serial_extra), run_dir=tmp_path / "serial")
    dist = run_training(load_experiment(None, base + extra + ["runtime=distributed"]), run_dir=tmp_path / "dist")
    a, b = group_params(serial.run_dir), group_params(dist.run_dir)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.allclose(x, y, atol=1e-6, rtol=0)
    assert serial.final["test_acc"] == pytest.approx(dist.final["test_acc"], abs=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bp", "lct"])
def test_bf16_halves_the_bytes_across_the_cut(tmp_path, method):
    """workers.csv, from the channel's counters: activations (and bp's gradients) cost half under bf16; lct's loss
    message stays 4 bytes per sample."""
    sent = {}
    for precision in ("fp32", "bf16"):
        cfg = load_experiment(None, TINY + [f"method={method}", f"precision={precision}", "runtime=distributed"])
        workers = read_rows(run_training(cfg, run_dir=tmp_path / precision).run_dir / "workers.csv")
        sent[precision] = [w["bytes_sent"] for w in workers]
    assert sent["bf16"][0] * 2 == sent["fp32"][0]  # the activations forward
    if method == "bp":
        assert sent["bf16"][1] * 2 == sent["fp32"][1]  # the gradients back
    else:
        assert sent["bf16"][1] == sent["fp32"][1] == 64 * 4  # one fp32 loss per sample


@pytest.mark.parametrize("method", ["bp", "dni"])
def test_fp16_gradients_cross_the_cut_unscaled_in_fp32(monkeypatch, method):
    """Under fp16 each worker scales its own losses (GradScaler); the gradient group 1 receives is the true one
    (fp32, within fp16 rounding of the fp32 run's), not one multiplied by group 2's loss scale (65536 at first).
    The scaler's state is part of the stage's checkpoint. fp16 runs emulated here (the native check is patched)."""
    import lctrun.precision

    monkeypatch.setattr(lctrun.precision, "cpu_has_native_fp16", lambda: True)
    received = {}
    for precision in ("fp32", "fp16"):
        p = prepare(load_experiment(None, TINY + [f"method={method}", f"precision={precision}"]))
        runtime = make_serial_runtime(p)
        feedback = runtime.stages[0].feedback
        runtime.stages[0].feedback = lambda msg, precision=precision, f=feedback: (
            received.setdefault(precision, msg) is None or f(msg)
        )
        train, _ = make_loaders(p, "cpu")
        begin_epoch(p, runtime, 1, train)
        runtime.train_epoch(train)
        if precision == "fp16":
            assert runtime.stages[1].loss_scale() > 1 and "scaler" in runtime.stages[1].state_dict()
    first, second = received["fp32"], received["fp16"]
    assert second.dtype == torch.float32
    assert float((second - first).norm() / first.norm()) < 0.1  # fp16 rounding; the scale would be a factor 1e4
