"""Per-worker measurements: an analytic memory account of a stage, independent of the allocator."""

from __future__ import annotations

import torch

from lctrun.methods import Stage


class SavedTensors:
    """Counts the bytes autograd saves for backward inside the block (each storage once)."""

    def __init__(self):
        self.bytes = 0
        self._seen: set[int] = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            key = tensor.untyped_storage().data_ptr()
        except RuntimeError:
            key = id(tensor)
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += tensor.untyped_storage().nbytes()
        return tensor

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def state_account(stage: Stage) -> dict[str, float]:
    """MB of parameters, gradients and optimiser state of a stage's group and auxiliary modules, and of
    the per-sample auxiliary variables it stores (penalty / al)."""
    params = [p for m in stage.modules() for p in m.parameters()]
    optimizers = [stage.opt] + ([stage.aux_opt] if getattr(stage, "aux_opt", None) is not None else [])
    opt_state = sum(tensor_bytes(s.values()) for o in optimizers for s in o.state.values())
    mb = 2**20
    return {
        "params_mb": round(tensor_bytes(params) / mb, 3),
        "grads_mb": round(tensor_bytes(p for p in params if p.requires_grad) / mb, 3),
        "optim_mb": round(opt_state / mb, 3),
        "aux_vars_mb": round(tensor_bytes(stage.state_tensors()) / mb, 3),
    }
