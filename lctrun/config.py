"""Typed experiment configuration: dataclasses loaded from YAML plus dotted KEY=VALUE overrides.

Every key is checked against the schema; an unknown key names the nearest valid ones. Each field declares
its allowed values once, in its type: a Literal of choices, bool, or Annotated with a rule (Range, Match,
Length, PathName; the aliases below); the checks and their one-line messages come from these rules. Only
relations between fields (validate) are written out.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from lctrun.errors import ConfigError, quoted

INT_MAX = 2**31 - 1  # no int field goes beyond: it fits every integer type downstream (torch, numpy, random)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class Range:
    """A number's allowed values: from `low` (excluded if low_open) to `high` (excluded if high_open); a float
    must be finite, an int within +-INT_MAX."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    why: str = ""  # said after the bounds, e.g. "(or null for the whole set)"

    def check(self, key: str, value) -> None:
        is_int = isinstance(value, int)
        low, high = (max(self.low, -INT_MAX), min(self.high, INT_MAX)) if is_int else (self.low, self.high)
        below = value < low or (value == low and self.low_open)
        above = value > high or (value == high and self.high_open)
        if below or above or (not is_int and not math.isfinite(value)):
            bounds = [f"{'>' if self.low_open else '>='} {_number(low)}"] * math.isfinite(low)
            bounds += [f"{'<' if self.high_open else '<='} {_number(high)}"] * math.isfinite(high)
            what = " and ".join(bounds) if is_int else f"a finite number {' and '.join(bounds)}".rstrip()
            raise ConfigError(f"{key} must be {what}{' ' + self.why if self.why else ''}, got {value}")


@dataclass(frozen=True)
class Match:
    """A string's allowed values: the whole string matches `pattern`, at most 200 characters."""

    pattern: str
    what: str  # what the pattern allows, in words

    def check(self, key: str, value: str) -> None:
        if len(value) > 200 or not re.fullmatch(self.pattern, value):
            raise ConfigError(f"{key}={quoted(value)} is not {self.what}")


@dataclass(frozen=True)
class Length:
    """A list's allowed lengths."""

    low: int = 0
    high: int = 1024
    what: str = ""  # e.g. "[C, H, W]"

    def check(self, key: str, value: list) -> None:
        if not self.low <= len(value) <= self.high:
            size = f"{self.low} entries" if self.low == self.high else f"{self.low} to {self.high} entries"
            raise ConfigError(f"{key} must have {size}{' ' + self.what if self.what else ''}, got {value}")


# A run name is one path component that Linux, macOS and Windows all accept: letters, digits, '.', '_', '-',
# starting and ending with a letter or digit (Windows drops a trailing dot), and not a Windows device name.
SAFE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,62}[A-Za-z0-9])?")
DEVICE_NAMES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def slug(text: str) -> str:
    """A safe name close to `text`, to suggest in the refusal."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-")[:60].strip("-") or "experiment"
    return f"{name}-run" if name.lower() in DEVICE_NAMES else name


@dataclass(frozen=True)
class PathName:
    """A name that goes into a run directory's path: refused (never rewritten) unless one safe component."""

    def check(self, key: str, value: str) -> None:
        if not SAFE_NAME.fullmatch(value) or value.split(".")[0].lower() in DEVICE_NAMES:
            raise ConfigError(
                f"{key}={quoted(value)} cannot name a run directory: use 1-64 letters, digits, '.', '_' or '-', "
                f"starting and ending with a letter or digit (e.g. {key}={slug(value)})"
            )


Count = Annotated[int, Range(1)]  # 1, 2, ...
Index = Annotated[int, Range(0)]  # 0, 1, ...
Rate = Annotated[float, Range(0, low_open=True)]  # finite > 0
Decay = Annotated[float, Range(0)]  # finite >= 0
Name = Annotated[str, PathName()]
Word = Annotated[str, Match(r"[A-Za-z0-9][A-Za-z0-9._-]*", "a name (letters, digits, '.', '_', '-')")]
Block = Annotated[str, Match(r"[A-Za-z0-9_][A-Za-z0-9_.]*", "a block name (e.g. layer2, layer3.8)")]
Device = Annotated[str, Match(r"[a-z]+(:[0-9]{1,3})?", "a device (cpu, cuda, cuda:1, mps)")]
Folder = Annotated[str, Match(r"[^\x00-\x1f]+", "a folder path (no control characters)")]


@dataclass
class DataConfig:
    name: Word = "shapes"  # mnist | fashion-mnist | cifar10 | cifar100 | shapes | fake | seqmnist | ptb
    root: Folder | None = None  # default: $LCTRUN_DATA, else ./data
    download: bool = False
    train_size: Annotated[int, Range(1, why="(or null for the whole set)")] | None = None  # the first N of a
    # seeded permutation of the training set
    test_size: Annotated[int, Range(1, why="(or null for the whole set)")] | None = None
    augment: bool | Literal["none", "crop", "flip", "crop-flip"] = True  # true: the dataset's standard (CIFAR:
    # crop+flip), false: none
    batch_size: Count = 128
    test_batch_size: Count = 500
    shape: Annotated[list[Annotated[int, Range(1, 4096)]], Length(3, 3, "[C, H, W] (e.g. [3, 32, 32])")] = field(
        default_factory=lambda: [3, 32, 32]
    )  # fake data only
    num_classes: Annotated[int, Range(2, 100_000)] = 10  # fake data only
    seq_len: Count = 35  # ptb only: tokens per training sequence


@dataclass
class ModelConfig:
    name: Word = "cnn-small"
    # cut after these named blocks, e.g. [layer2, layer3.8]
    split: Annotated[list[Block], Length()] = field(default_factory=list)
    groups: Count = 1  # K; used when split is empty: cut automatically
    balance: Literal["params", "flops", "time"] = "params"  # what the automatic cut balances (critics included)


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam"] = "sgd"
    lr: Rate = 0.1
    momentum: Annotated[float, Range(0, 1, high_open=True)] = 0.9
    nesterov: bool = False
    weight_decay: Decay = 5e-4
    schedule: Literal["none", "multistep", "cosine"] = "none"  # advanced every optimiser step; milestones in epochs
    milestones: Annotated[list[Index], Length()] = field(default_factory=list)  # epochs, for multistep
    gamma: Rate = 0.1


@dataclass
class CriticConfig:
    """Auxiliary modules of lct (critics), dgl (heads) and dni (gradient synthesizers)."""

    convs: Annotated[list[Count], Length(1)] = field(default_factory=lambda: [1])  # conv3x3 layers per critic;
    # one entry = all critics
    channels: Count = 128
    pool: Annotated[int, Range(0, why="(0: no pooling, the official critic)")] = 0  # > 0: average conv features
    # down to pool x pool before the critic's convs (cheaper)
    loss: Literal["l1", "mse"] = "l1"  # critic cascade loss against the next group's per-sample loss
    optim: Literal["adam", "sgd"] = "adam"
    lr: Rate = 1e-4
    weight_decay: Decay = 0.0
    update_every: Count = 1  # train the critics every n steps (ICLR table 3)
    # lct: what critic k learns to match. next: l_{k+1} (the LCT cascade); final: the true loss l_K of the
    # output (critic training, Czarnecki et al. 2017: the ICLR table 1 baseline)
    target: Literal["next", "final"] = "next"


@dataclass
class LayerParallelConfig:
    """Penalty / augmented-Lagrangian layer-parallel training (docs/methods.md section 6, methods/layerpar.py)."""

    beta: Rate = 0.01  # initial penalty weight
    beta_growth: Annotated[float, Range(1, why="(beta never shrinks)")] = 2.0  # beta *= growth after every
    # parallel epoch (the outer iteration)
    beta_max: Rate = 1000.0
    lambda_lr: Rate = 100.0  # eta, step size of the proximal auxiliary-variable update
    fit_step: Rate = 0.1  # a regression step of group k < K is at most this times the Polyak step (layerpar.py)
    # storage of lambda, mu and the stored phi (their arithmetic is fp32); not the compute precision (`precision`).
    # Was `layerpar.precision`, still read (ALIASES)
    storage: Literal["fp32", "bf16", "fp16"] = "fp32"
    downsample: Literal[1, 2, 4] = 1  # spatial factor of what crosses / is stored at a boundary
    filter: Literal["avg", "bilinear"] = "avg"  # avg (average pool down, nearest up) | bilinear (antialiased down)
    sph: bool = False  # serial-parallel hybrid: alternate parallel and serial (backprop) phases
    parallel_epochs: Count = 1  # per SPH cycle, first
    serial_epochs: Count = 1  # per SPH cycle, second
    cycles: Count | None = None  # SPH cycles; when set, epochs must equal cycles * (parallel + serial epochs)


@dataclass
class PipelineConfig:
    """Micro-batched backprop (method=bp; docs/methods.md section 2): one update per batch from the gradients
    of its M micro-batches, summed. How the micro-batches run is the runtime's: one after another (serial, or
    distributed with schedule=none), or in a torch.distributed.pipelining schedule across the K workers."""

    schedule: Literal["none", "gpipe", "1f1b"] = "none"  # gpipe, 1f1b: runtime=distributed
    microbatches: Count = 1  # M, dividing data.batch_size


@dataclass
class Experiment:
    name: Name = "experiment"
    seed: Index = 0
    epochs: Count = 1
    method: Name = "bp"  # bp | lct | dgl | dni | penalty | al
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    layerpar: LayerParallelConfig = field(default_factory=LayerParallelConfig)
    runtime: Literal["serial", "distributed"] = "serial"
    workers: Count | None = None  # distributed: number of worker processes (default: one per group)
    # distributed bp only: `workers` replicas of the whole model, each on 1/workers of every batch (DDP)
    data_parallel: bool = False
    devices: Annotated[list[Device], Length(1)] = field(default_factory=lambda: ["cpu"])  # one per group, or one
    # for all
    threads_per_worker: Count | None = None  # default: cores // workers (serial: all cores)
    pipeline_depth: Count = 1  # batches in flight per worker (1 = synchronous); local methods, not bp
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)  # bp's micro-batch schedules
    eval_every: Count = 1  # epochs between test evaluations (the last epoch is always evaluated)
    submodels: bool = True  # evaluate sub-models / ensembles / progressive inference where a method has them
    exit_thresholds: Annotated[list[Annotated[float, Range(0, 1, low_open=True)]], Length(1)] = field(
        default_factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]
    )
    # the compute precision of every forward (autocast): groups, critics, heads, synthesizers, probes; parameters,
    # optimiser state and the losses a rule compares stay fp32, and activations/gradients cross cuts in it
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    memory_format: Literal["contiguous", "channels_last"] = "contiguous"  # of the model and every batch (4-D only)


# Old key names still read: a file or override with the key on the left sets the one on the right.
ALIASES = {"layerpar.precision": "layerpar.storage"}


def hints(cls: type) -> dict[str, Any]:
    """A config section's field types, with their Annotated rules."""
    return typing.get_type_hints(cls, include_extras=True)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotated type `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        inner, *rules = typing.get_args(tp)
        value = _coerce(value, inner, key)
        for rule in rules:
            rule.check(key, value)
        return value
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
    types_ = hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        key = ALIASES.get(prefix + str(key), prefix + str(key))[len(prefix) :]
        if key not in types_:
            raise _unknown_key(str(key), names, prefix)
        kwargs[key] = _coerce(value, types_[key], prefix + key)
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
            types_ = hints(cls)
            if part not in types_ or not dataclasses.is_dataclass(types_[part]):
                sections = [n for n, t in types_.items() if dataclasses.is_dataclass(t)]
                if part not in types_:
                    raise _unknown_key(part, sections, ".".join(path[:depth]) + ("." if depth else ""))
                raise ConfigError(f"{quoted('.'.join(path[: depth + 1]))} is not a section; write {quoted(part)}=VALUE")
            cls = types_[part]
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
    """Checks of relations between fields (each field's own range is checked by _coerce, from its type)."""
    lp = cfg.layerpar
    if lp.cycles is not None:
        per_cycle = lp.parallel_epochs + lp.serial_epochs
        if not lp.sph:
            raise ConfigError("layerpar.cycles is set but layerpar.sph is false (set layerpar.sph=true)")
        if cfg.epochs != lp.cycles * per_cycle:
            raise ConfigError(
                f"layerpar.cycles={lp.cycles} with {lp.parallel_epochs}+{lp.serial_epochs} epochs per cycle needs "
                f"epochs={lp.cycles * per_cycle}, got epochs={cfg.epochs}"
            )
    check_microbatches(cfg)
    check_data_parallel(cfg)
    check_compute(cfg)


def check_compute(cfg: Experiment) -> None:
    """precision and memory_format against the devices and the data (lctrun.precision)."""
    from lctrun.data import input_shape
    from lctrun.precision import check_precision

    try:
        shape = input_shape(cfg.data)
    except ConfigError:  # an unknown dataset is said where the data is loaded, with its suggestions
        shape = None
    check_precision(cfg.precision, cfg.memory_format, cfg.devices, None if shape is None else len(shape))
    if cfg.precision == "fp16" and cfg.pipeline.schedule != "none":
        raise ConfigError(
            f"precision=fp16 with pipeline.schedule={cfg.pipeline.schedule}: the schedule's workers would need one "
            "shared loss scale, which lctrun does not keep; use precision=bf16 (no loss scale needed)"
        )


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
