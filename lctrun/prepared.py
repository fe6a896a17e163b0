"""A prepared run: the data, the model cut into groups, the method, the groups' shapes and devices; what
every runtime builds its stages from (`prepare`), and the per-epoch set-up the loop and bench share."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import torch

from lctrun.config import Experiment
from lctrun.data import DataBundle, TensorLoader, load_data, test_loader, train_loader
from lctrun.errors import ConfigError
from lctrun.methods import EpochPlan, Method, build_stage, get_method, group_shapes
from lctrun.models import build_model, split_groups
from lctrun.models.chain import Group
from lctrun.precision import autocast, check_precision, in_memory_format, to_memory_format
from lctrun.runtime.serial import SerialRuntime


@dataclass
class Prepared:
    cfg: Experiment
    data: DataBundle
    groups: list[Group]
    method: Method
    shapes: list
    devices: list[torch.device] = field(default_factory=list)
    block_names: list[list[str]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def group_devices(cfg: Experiment, num_groups: int) -> list[torch.device]:
    names = cfg.devices
    if len(names) == 1:
        names = names * num_groups
    elif len(names) < num_groups:
        raise ConfigError(
            f"{num_groups} groups but only {len(names)} devices ({', '.join(cfg.devices)}): give one device per "
            f"group, or a single device for all"
        )
    devices = []
    for name in names[:num_groups]:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ConfigError(f"devices: '{name}' is not a device (use cpu, cuda, cuda:0, ...)") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"devices: '{name}' asked for, but CUDA is not available here (use devices=[cpu])")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ConfigError(f"devices: '{name}' does not exist ({torch.cuda.device_count()} CUDA devices)")
        devices.append(device)
    return devices


def prepare(cfg: Experiment, check_devices: bool = True) -> Prepared:
    """Everything a runtime needs, built the same way (same seed) in every process."""
    method = get_method(cfg.method)
    data = load_data(cfg.data, cfg.seed)
    check_precision(cfg.precision, cfg.memory_format, cfg.devices, len(data.in_shape))  # the data's own shape
    data = in_memory_format(data, cfg.memory_format)
    seed_everything(cfg.seed)
    try:  # building and cutting run the model on a sample: inputs too small for it fail here
        # a time-balanced cut times each block (and critic) as it will run: in its precision and memory format
        model = to_memory_format(build_model(cfg.model.name, data.num_classes, data.in_shape), cfg.memory_format)
        sample = None
        if cfg.model.balance in ("time", "flops"):
            loader = TensorLoader(
                data.train_x, data.train_y, min(cfg.data.batch_size, len(data.train_y)), shuffle=False
            )
            sample = next(iter(loader)).x
        n_aux = max(cfg.model.groups - 1, 1)

        def aux_for(shape, j):
            aux = method.aux_module(shape, cfg.critic, data.num_classes, j, n_aux)
            return None if aux is None else to_memory_format(aux, cfg.memory_format)

        with autocast(cfg.precision, ["cpu"]):  # where the blocks are built and timed
            groups = split_groups(model, cfg.model.split, cfg.model.groups, cfg.model.balance, sample, aux_for)
        shapes = group_shapes(groups, data.in_shape)
    except RuntimeError as e:
        problem = " ".join(str(e).split())[:200]
        raise ConfigError(
            f"model {cfg.model.name} cannot run on {cfg.data.name} inputs of shape {list(data.in_shape)}: {problem} "
            f"(use larger inputs or a model made for them)"
        ) from None
    devices = group_devices(cfg, len(groups)) if check_devices else []
    names = [g.block_names for g in groups]
    return Prepared(cfg, data, groups, method, shapes, devices, names)


def make_loaders(p: Prepared, device: torch.device, load_x: bool = True) -> tuple[TensorLoader, TensorLoader]:
    d, cfg = p.data, p.cfg
    return (
        train_loader(d, cfg.data.batch_size, cfg.seed, device, load_x, cfg.memory_format),
        test_loader(d, cfg.data.test_batch_size, device, load_x, cfg.memory_format),
    )


def begin_epoch(p: Prepared, runtime, epoch: int, loader: TensorLoader, refresh: bool = True) -> EpochPlan:
    """Set up epoch `epoch` as the method plans it: augmentation, the stages' phase, a refresh pass
    (not when continuing the epoch from a mid-epoch checkpoint: its state is already past it)."""
    plan = p.method.plan(p.cfg, epoch)
    loader.set_epoch(epoch)
    loader.augment = p.data.augment if plan.augment else "none"
    runtime.begin_epoch(plan)
    if plan.refresh and refresh:
        ordered = TensorLoader(
            p.data.train_x,
            p.data.train_y,
            p.cfg.data.batch_size,
            shuffle=False,
            mean=p.data.mean,
            std=p.data.std,
            device=loader.device,
            load_x=loader.load_x,
            memory_format=p.cfg.memory_format,
        )
        runtime.refresh(ordered)
    return plan


def make_serial_runtime(p: Prepared) -> SerialRuntime:
    torch.set_num_threads(p.cfg.threads_per_worker or os.cpu_count() or 1)
    stages = [build_stage(p, k, p.devices[k]) for k in range(len(p.groups))]
    return SerialRuntime(p.method, stages)
