"""Typed experiment configuration: dataclasses loaded from YAML plus dotted KEY=VALUE overrides.

Every key is checked against the schema; an unknown key names the nearest valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lctrun.errors import ConfigError, quoted


@dataclass
class DataConfig:
    name: str = "shapes"  # mnist | fashion-mnist | cifar10 | cifar100 | shapes | fake | seqmnist | ptb
    root: str | None = None  # default: $LCTRUN_DATA, else ./data
    download: bool = False
    train_size: int | None = None  # take a subset of the training set (first N of a seeded permutation)
    test_size: int | None = None
    augment: bool | Literal["none", "crop", "flip", "crop-flip"] = True  # true: the dataset's standard (CIFAR:
    # crop+flip), false: none
    batch_size: int = 128
    test_batch_size: int = 500
    shape: list[int] = field(default_factory=lambda: [3, 32, 32])  # fake data only
    num_classes: int = 10  # fake data only
    seq_len: int = 35  # ptb only: tokens per training sequence


@dataclass
class ModelConfig:
    name: str = "cnn-small"
    split: list[str] = field(default_factory=list)  # cut after these named blocks, e.g. [layer2, layer3.8]
    groups: int = 1  # K; used when split is empty: cut automatically
    balance: Literal["params", "flops", "time"] = "params"  # what the automatic cut balances (critics included)


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: Literal["none", "multistep", "cosine"] = "none"  # advanced every optimiser step; milestones in epochs
    milestones: list[int] = field(default_factory=list)  # epochs, for multistep
    gamma: float = 0.1


@dataclass
class CriticConfig:
    """Auxiliary modules of lct (critics), dgl (heads) and dni (gradient synthesizers)."""

    convs: list[int] = field(default_factory=lambda: [1])  # conv3x3 layers per critic; one entry = all critics
    channels: int = 128
    pool: int = 0  # > 0: average conv features down to pool x pool before the critic's convs (cheaper); 0: official
    loss: Literal["l1", "mse"] = "l1"  # critic cascade loss against the next group's per-sample loss
    optim: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    update_every: int = 1  # train the critics every n steps (ICLR table 3)
    # lct: what critic k learns to match. next: l_{k+1} (the LCT cascade); final: the true loss l_K of the
    # output (critic training, Czarnecki et al. 2017: the ICLR table 1 baseline)
    target: Literal["next", "final"] = "next"


@dataclass
class LayerParallelConfig:
    """Penalty / augmented-Lagrangian layer-parallel training (docs/methods.md section 6, methods/layerpar.py)."""

    beta: float = 0.01  # initial penalty weight
    beta_growth: float = 2.0  # beta *= growth after every parallel epoch (the outer iteration)
    beta_max: float = 1000.0
    lambda_lr: float = 100.0  # eta, step size of the proximal auxiliary-variable update
    fit_step: float = 0.1  # a regression step of group k < K is at most this times the Polyak step (layerpar.py)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # storage of lambda, mu and the stored phi (fp32 arithmetic)
    downsample: Literal[1, 2, 4] = 1  # spatial factor of what crosses / is stored at a boundary
    filter: Literal["avg", "bilinear"] = "avg"  # avg (average pool down, nearest up) | bilinear (antialiased down)
    sph: bool = False  # serial-parallel hybrid: alternate parallel and serial (backprop) phases
    parallel_epochs: int = 1  # per SPH cycle, first
    serial_epochs: int = 1  # per SPH cycle, second
    cycles: int | None = None  # SPH cycles; when set, epochs must equal cycles * (parallel + serial epochs)


@dataclass
class PipelineConfig:
    """Micro-batched backprop (method=bp; docs/methods.md section 2): one update per batch from the gradients
    of its M micro-batches, summed. How the micro-batches run is the runtime's: one after another (serial, or
    distributed with schedule=none), or in a torch.distributed.pipelining schedule across the K workers."""

    schedule: Literal["none", "gpipe", "1f1b"] = "none"  # gpipe, 1f1b: runtime=distributed
    microbatches: int = 1  # M, dividing data.batch_size


@dataclass
class Experiment:
    name: str = "experiment"
    seed: int = 0
    epochs: int = 1
    method: str = "bp"  # bp | lct | dgl | dni | penalty | al
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    layerpar: LayerParallelConfig = field(default_factory=LayerParallelConfig)
    runtime: Literal["serial", "distributed"] = "serial"
    workers: int | None = None  # distributed: number of worker processes (default: one per group)
    # distributed bp only: `workers` replicas of the whole model, each on 1/workers of every batch (DDP)
    data_parallel: bool = False
    devices: list[str] = field(default_factory=lambda: ["cpu"])  # one per group, or one for all
    threads_per_worker: int | None = None  # default: cores // workers (serial: all cores)
    pipeline_depth: int = 1  # batches in flight per worker (1 = synchronous); local methods, not bp
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)  # bp's micro-batch schedules
    eval_every: int = 1  # epochs between test evaluations (the last epoch is always evaluated)
    submodels: bool = True  # evaluate sub-models / ensembles / progressive inference where a method has them
    exit_thresholds: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95, 0.99])


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotated type `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append((typing.get_origin(arg) is Literal, e))
        raise max(errors, key=lambda pair: pair[0])[1]  # a list of choices says more than "expected bool"
    if origin is Literal:
        choices = typing.get_args(tp)
        if any(value == c and type(value) is type(c) for c in choices):
            return value
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, choices))}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `split=layer2` means `split=[layer2]`
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `5e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _unknown_key(key: str, valid: list[str], prefix: str) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(prefix + n for n in near)}?" if near else f"valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key {quoted(prefix + str(key))}: {hint}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key(str(key), names, prefix)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {quoted(text)} is not KEY=VALUE (e.g. optim.lr=0.05)")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {quoted(text)} has an empty key (use KEY=VALUE, e.g. epochs=2)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Merge dotted KEY=VALUE overrides into a raw config mapping (validated later by from_dict)."""
    for text in overrides:
        path, value = parse_override(text)
        node, cls = data, Experiment
        for depth, part in enumerate(path[:-1]):
            hints = typing.get_type_hints(cls)
            if part not in hints or not dataclasses.is_dataclass(hints[part]):
                sections = [n for n, t in hints.items() if dataclasses.is_dataclass(t)]
                if part not in hints:
                    raise _unknown_key(part, sections, ".".join(path[:depth]) + ("." if depth else ""))
                raise ConfigError(f"{quoted('.'.join(path[: depth + 1]))} is not a section; write {quoted(part)}=VALUE")
            cls = hints[part]
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{quoted('.'.join(path[: depth + 1]))} must be a mapping in the experiment file")
        node[path[-1]] = value
    return data


def load_experiment(path: str | Path | None, overrides: list[str] | None = None) -> Experiment:
    """Read an experiment YAML file (or start from defaults when path is None) and apply overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"experiment file not found: {path} (see `lctrun list` for the experiments)")
        try:
            data = yaml.safe_load(path.read_text())
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (an experiment is UTF-8 YAML)") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            problem = " ".join(str(getattr(e, "problem", None) or e).split())  # yaml's reader errors span lines
            raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
        if data is None:
            raise ConfigError(f"{path} is empty: an experiment sets at least one config key (e.g. method: lct)")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: an experiment must be a YAML mapping of config keys")
        data.setdefault("name", path.stem)
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(Experiment, data)
    validate(cfg)
    return cfg


def validate(cfg: Experiment) -> None:
    """Checks that need more than a type (choices are Literal types, checked by _coerce): value ranges."""
    positive = {
        "epochs": cfg.epochs,
        "data.batch_size": cfg.data.batch_size,
        "data.test_batch_size": cfg.data.test_batch_size,
        "model.groups": cfg.model.groups,
        "pipeline_depth": cfg.pipeline_depth,
        "pipeline.microbatches": cfg.pipeline.microbatches,
        "critic.update_every": cfg.critic.update_every,
        "critic.channels": cfg.critic.channels,
        "eval_every": cfg.eval_every,
        "layerpar.parallel_epochs": cfg.layerpar.parallel_epochs,
        "layerpar.serial_epochs": cfg.layerpar.serial_epochs,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    for key in ("train_size", "test_size"):
        value = getattr(cfg.data, key)
        if value is not None and value < 1:
            raise ConfigError(f"data.{key} must be >= 1 (or null for the whole set), got {value}")
    if len(cfg.data.shape) != 3 or any(v < 1 for v in cfg.data.shape):
        raise ConfigError(f"data.shape must be [C, H, W] with sizes >= 1 (e.g. [3, 32, 32]), got {cfg.data.shape}")
    ranges = {  # key: (value, low, low allowed, high); every one must also be finite
        "optim.lr": (cfg.optim.lr, 0, False, math.inf),
        "optim.momentum": (cfg.optim.momentum, 0, True, 1),
        "optim.weight_decay": (cfg.optim.weight_decay, 0, True, math.inf),
        "optim.gamma": (cfg.optim.gamma, 0, False, math.inf),
        "critic.lr": (cfg.critic.lr, 0, False, math.inf),
        "critic.weight_decay": (cfg.critic.weight_decay, 0, True, math.inf),
    }
    for key, (value, low, low_ok, high) in ranges.items():
        if not math.isfinite(value) or value < low or (value == low and not low_ok) or value >= high:
            bound = f"{'>=' if low_ok else '>'} {low}" + (f" and < {high}" if math.isfinite(high) else "")
            raise ConfigError(f"{key} must be a finite number {bound}, got {value}")
    if cfg.data.num_classes < 2:
        raise ConfigError(f"data.num_classes must be >= 2, got {cfg.data.num_classes}")
    if cfg.critic.pool < 0:
        raise ConfigError(f"critic.pool must be >= 0 (0: no pooling, the official critic), got {cfg.critic.pool}")
    if any(c < 1 for c in cfg.critic.convs):
        raise ConfigError(f"critic.convs entries must be >= 1, got {cfg.critic.convs}")
    lp = cfg.layerpar
    for key in ("beta", "beta_max", "lambda_lr", "fit_step"):
        if not getattr(lp, key) > 0 or not math.isfinite(getattr(lp, key)):
            raise ConfigError(f"layerpar.{key} must be a finite number > 0, got {getattr(lp, key)}")
    if not 1 <= lp.beta_growth < math.inf:
        raise ConfigError(f"layerpar.beta_growth must be >= 1 (beta never shrinks), got {lp.beta_growth}")
    if lp.cycles is not None:
        per_cycle = lp.parallel_epochs + lp.serial_epochs
        if not lp.sph:
            raise ConfigError("layerpar.cycles is set but layerpar.sph is false (set layerpar.sph=true)")
        if lp.cycles < 1 or cfg.epochs != lp.cycles * per_cycle:
            raise ConfigError(
                f"layerpar.cycles={lp.cycles} with {lp.parallel_epochs}+{lp.serial_epochs} epochs per cycle needs "
                f"epochs={max(lp.cycles, 1) * per_cycle}, got epochs={cfg.epochs}"
            )
    check_microbatches(cfg)
    check_data_parallel(cfg)
    if cfg.workers is not None and cfg.workers < 1:
        raise ConfigError(f"workers must be >= 1, got {cfg.workers}")
    if cfg.threads_per_worker is not None and cfg.threads_per_worker < 1:
        raise ConfigError(f"threads_per_worker must be >= 1, got {cfg.threads_per_worker}")


def check_microbatches(cfg: Experiment) -> None:
    pipe, batch = cfg.pipeline, cfg.data.batch_size
    if pipe.schedule != "none" or pipe.microbatches > 1:
        if cfg.method != "bp":
            what = f"pipeline.schedule={pipe.schedule}" if pipe.schedule != "none" else "pipeline.microbatches"
            raise ConfigError(
                f"{what} is micro-batched backprop: use method=bp (method={cfg.method} has no micro-batches)"
            )
    if pipe.microbatches > 1 and pipe.schedule == "none" and cfg.runtime == "distributed":
        raise ConfigError(
            "pipeline.microbatches on runtime=distributed runs under a schedule: add pipeline.schedule=gpipe (or 1f1b)"
        )
    groups = len(cfg.model.split) + 1 if cfg.model.split else cfg.model.groups
    if pipe.schedule == "1f1b" and pipe.microbatches < groups:
        raise ConfigError(
            "pipeline.schedule=1f1b needs at least one micro-batch per group: "
            f"pipeline.microbatches={pipe.microbatches} < {groups} groups (raise it, or use pipeline.schedule=gpipe)"
        )
    if pipe.schedule != "none" and cfg.runtime != "distributed":
        raise ConfigError(
            f"pipeline.schedule={pipe.schedule} runs the micro-batches across workers: add runtime=distributed "
            "(in one process, pipeline.microbatches alone gives the same update)"
        )
    if pipe.microbatches > batch or batch % pipe.microbatches:
        near = max(d for d in range(1, min(pipe.microbatches, batch) + 1) if batch % d == 0)
        raise ConfigError(
            f"pipeline.microbatches={pipe.microbatches} must divide data.batch_size={batch} "
            f"(e.g. pipeline.microbatches={near})"
        )


def check_data_parallel(cfg: Experiment) -> None:
    if not cfg.data_parallel:
        return
    fix = "data_parallel=true trains K replicas of the whole model with bp"
    if cfg.runtime != "distributed" or cfg.method != "bp":
        raise ConfigError(f"{fix}: set runtime=distributed method=bp (got runtime={cfg.runtime} method={cfg.method})")
    if cfg.model.split or cfg.model.groups != 1:
        raise ConfigError(f"{fix}, uncut: drop model.split and set model.groups=1")
    if cfg.pipeline.schedule != "none" or cfg.pipeline.microbatches != 1:
        raise ConfigError(f"{fix}, without micro-batches: drop pipeline.schedule and pipeline.microbatches")
    if cfg.workers is None:
        raise ConfigError(f"{fix}: give the number of replicas, e.g. workers=2")
