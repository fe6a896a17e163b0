"""Mixed precision and memory format: what `precision` and `memory_format` in an experiment change.

Under `precision: bf16` (or fp16) every forward runs in torch.autocast: the groups, critics, heads,
synthesizers and probes compute in the low-precision dtype, while parameters, gradients of parameters and
optimiser state stay fp32 (autocast casts weights per op; nothing converts the modules). Losses are taken on
fp32 logits (methods.base.per_sample_loss), so the per-sample losses a rule compares (lct's critic target,
dni's regression, the penalty/al arithmetic) are fp32. Activations and activation gradients cross a cut in
the compute dtype (Wire.dtype): under bf16 a message costs half the bytes of fp32. Under fp16 every stage
keeps its own loss scale (Stage.scaler) and gradients cross a cut unscaled, in fp32 (docs/methods.md section 8).

`memory_format: channels_last` stores the model's 4-D weights and every input batch channels-last (NHWC),
the layout the CPU's oneDNN and the GPU's tensor-core convolutions run fastest on; activations then stay
channels-last through the network, and messages keep the layout across a cut (transport.Channel).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import replace
from pathlib import Path

import torch

from lctrun.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype forwards compute in, and activations and their gradients travel in."""
    return DTYPES[precision]


def memory_format(name: str) -> torch.memory_format:
    return MEMORY_FORMATS[name]


def autocast(precision: str, devices) -> contextlib.AbstractContextManager:
    """Autocast for every device type among `devices` (a serial run may mix CPU and GPUs); a no-op at fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for kind in sorted({torch.device(d).type for d in devices}):
        stack.enter_context(torch.autocast(kind, dtype=DTYPES[precision]))
    return stack


def cpu_has_native_fp16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes fp16 natively (AVX512-FP16 or AMX-FP16); elsewhere PyTorch emulates it slowly."""
    if not sys.platform.startswith("linux") or not cpuinfo.exists():
        return False
    flags = set(cpuinfo.read_text(errors="replace").split())
    return bool(flags & {"avx512_fp16", "amx_fp16"})


def check_precision(precision: str, memory_format_name: str, devices: list[str], input_dims: int | None) -> None:
    """Refuse, in one line and before anything starts, a precision or format that the devices or data cannot use."""
    if precision == "fp16" and any(torch.device(d).type == "cpu" for d in devices) and not cpu_has_native_fp16():
        raise ConfigError(
            "precision=fp16 on this CPU: it has no native fp16 (no AVX512-FP16 or AMX-FP16), so fp16 would be "
            "emulated and slower than fp32; use precision=bf16 (or fp16 on CUDA devices)"
        )
    if memory_format_name == "channels_last" and input_dims is not None and input_dims != 3:
        raise ConfigError(
            "memory_format=channels_last is for image data (C, H, W), but this dataset's samples have "
            f"{input_dims} dimension(s): use memory_format=contiguous"
        )


def to_memory_format(module: torch.nn.Module, name: str) -> torch.nn.Module:
    """The module with its 4-D weights in the layout `name` (other parameters are unaffected)."""
    return module if name == "contiguous" else module.to(memory_format=MEMORY_FORMATS[name])


def in_memory_format(data, name: str):
    """The DataBundle with its image tensors in the layout `name`, converted once for every loader made from it."""
    if name == "contiguous" or data.train_x.dim() != 4:
        return data
    fmt = MEMORY_FORMATS[name]
    return replace(
        data, train_x=data.train_x.contiguous(memory_format=fmt), test_x=data.test_x.contiguous(memory_format=fmt)
    )
