"""The auxiliary modules local methods attach after a group: classifiers (lct critics, dgl heads) and
gradient synthesizers (dni). Their shape follows the group's output: conv features (C, H, W), flat
features (D,), or sequences (T, D)."""

from __future__ import annotations

import torch
from torch import nn

from lctrun.config import CriticConfig
from lctrun.errors import ConfigError


def critic_depth(cfg: CriticConfig, k: int, num_critics: int) -> int:
    """critic.convs: one entry for every critic, or one per critic (ICLR table 2: [1,1,1], [5,4,3])."""
    if len(cfg.convs) == 1:
        return cfg.convs[0]
    if len(cfg.convs) != num_critics:
        raise ConfigError(
            f"critic.convs={cfg.convs} has {len(cfg.convs)} entries but the cut gives {num_critics} critics: "
            f"give one entry, or one per critic"
        )
    return cfg.convs[k]


class LastStep(nn.Module):
    """(B, T, D) -> (B, D): a sequence classifier reads the last time step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -1]


def make_classifier(
    in_shape: tuple[int, ...], num_classes: int, depth: int, channels: int, per_step: bool = False, pool: int = 0
):
    """The official LCT critic for conv features: depth x (conv3x3(channels) -> ReLU) -> flatten -> linear.

    `pool` > 0 first averages the features down to a pool x pool grid (as DGL's and InfoPro's auxiliary
    nets do), so that the critic's convs cost (pool^2 / (H W)) of the official one's. Flat features get
    depth x (linear(channels) -> ReLU) -> linear. Sequences (T, D) are classified from the last step, or
    per step when `per_step` (language models predict every token).
    """
    if len(in_shape) == 3:
        c, h, w = in_shape
        layers: list[nn.Module] = []
        if 0 < pool < max(h, w):
            h, w = min(h, pool), min(w, pool)
            layers.append(nn.AdaptiveAvgPool2d((h, w)))
        for i in range(depth):
            layers += [nn.Conv2d(c if i == 0 else channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * h * w, num_classes))
    layers = [] if len(in_shape) == 1 or per_step else [LastStep()]
    width = in_shape[-1]
    for i in range(depth - 1):
        layers += [nn.Linear(width if i == 0 else channels, channels), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(width if depth == 1 else channels, num_classes))
    return nn.Sequential(*layers)


def make_synthesizer(in_shape: tuple[int, ...], channels: int) -> nn.Module:
    """DNI: predicts dL/dh from h; the last layer starts at zero so early updates are no-ops (Jaderberg et al.)."""
    if len(in_shape) == 3:
        c = in_shape[0]
        out = nn.Conv2d(channels, c, 3, padding=1)
        net = nn.Sequential(nn.Conv2d(c, channels, 3, padding=1), nn.ReLU(inplace=True), out)
    else:
        d = in_shape[-1]
        out = nn.Linear(channels, d)
        net = nn.Sequential(nn.Linear(d, channels), nn.ReLU(inplace=True), out)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    return net


def make_aux_optimizer(params, cfg: CriticConfig) -> torch.optim.Optimizer:
    if cfg.optim == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def stashed_forward(
    module: nn.Module, x: torch.Tensor, pipelined: bool = True
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward through a copy of the module's weights (weight stashing).

    The graph then stays valid while the module itself is updated by earlier batches' feedback
    (pipelining), and the gradient it yields is the one at the weights this batch saw. Without pipelining
    (a wire of depth 1) the feedback always comes before the next update: the live weights serve, uncopied."""
    if not pipelined:
        return module(x), dict(module.named_parameters())
    stash = {name: p.detach().clone().requires_grad_() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, stash, (x,)), stash


def step_from_stash(module: nn.Module, stash: dict[str, torch.Tensor], loss: torch.Tensor, opt, stage) -> None:
    """Backpropagate `loss` into the stashed weights, then step the module's own weights with it (through the
    stage's loss scaler: scaled, unscaled and checked under fp16, a plain step otherwise).

    Only the weights' gradients are asked for: the input's was taken at forward time, and a plain
    backward() would compute it again (a second conv input-backward per step)."""
    names = list(stash)
    grads = torch.autograd.grad(stage.scaled(loss), [stash[n] for n in names])
    params = dict(module.named_parameters())
    for name, grad in zip(names, grads, strict=True):
        params[name].grad = grad
    stage.step_with_scaler(opt)
