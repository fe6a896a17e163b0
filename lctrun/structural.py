"""Structural optimisation (docs/methods.md section 9): every group k < K plus its critic is a complete smaller
classifier, "sub-model k" (groups 1..k + critic k). Three uses are reported:

(a) a sub-model as a cheaper network: accuracy, parameters and FLOPs of each sub-model and the main model;
(b) ensembles: the sum of the softmax outputs of sub-models 1..K-1, without and with the main model;
(c) progressive inference: a sample exits at the first sub-model whose max softmax >= a threshold t.

For a BP-trained network, "the same cuts" get probe heads (the critic's architecture) trained on the frozen
features after each cut (ICLR table 4: sub-models of LCT vs the same cuts of BP).

The tables come from an `EvalOutput` (labels + per-group logits) and a cost list alone, so the distributed
runtime (logits gathered on rank 0, no stages there) can use them with `fresh_costs(p)`, which builds the
modules again (FLOPs and parameter counts do not depend on weights).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from lctrun.config import Experiment
from lctrun.data import DataBundle, TensorLoader, train_loader
from lctrun.evaluation import accuracy, percent_correct
from lctrun.methods.lct import make_critic
from lctrun.models.chain import forward_flops
from lctrun.precision import autocast, to_memory_format
from lctrun.runtime.base import EvalOutput, autocast_of

__all__ = [
    "count_flops",
    "count_params",
    "submodel_costs",
    "fresh_costs",
    "submodel_rows",
    "ensemble_rows",
    "progressive",
    "structural_tables",
    "write_tables",
    "probe_heads",
    "evaluate_submodels",
    "structural_report",
]

TABLES = ("submodels", "ensembles", "progressive")


# -- costs --------------------------------------------------------------------------------------------
def _device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def count_flops(module: nn.Module, in_shape: tuple[int, ...]) -> int:
    """FLOPs per sample of one forward pass (batch of 1, eval mode, no grad): models.chain.forward_flops."""
    mode = module.training
    module.eval()
    try:
        return forward_flops(module, torch.zeros(1, *in_shape, device=_device_of(module)))[0]
    finally:
        module.train(mode)


def count_params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@torch.no_grad()
def _chain_shapes(groups: list[nn.Module], in_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Per-sample input shape of every group, then the output shape of the last (a dry run in eval mode)."""
    shapes = [tuple(in_shape)]
    x = torch.zeros(1, *in_shape)
    for g in groups:
        mode = g.training
        g.eval()
        x = g(x.to(_device_of(g)))
        g.train(mode)
        shapes.append(tuple(x.shape[1:]))
    return shapes


def submodel_costs(groups: list[nn.Module], auxes: list[nn.Module | None], in_shape: tuple[int, ...]) -> list[dict]:
    """Cost of sub-model k = groups 1..k + aux k (k = 1..K-1), then of the main model (all groups).

    `auxes[k]` is the classifier after group k+1 (index from 0); it may hold K-1 or K entries (the last
    ignored) and entries may be None (no sub-model there: its aux cost is 0). Each entry: model, k, params,
    flops (per sample), flops_frac (of the main model), and the parts group_params/group_flops (group k
    alone) and aux_params/aux_flops (aux k alone) that the ensemble and progressive costs are built from.
    """
    K = len(groups)
    shapes = _chain_shapes(groups, in_shape)
    group_flops = [count_flops(g, shapes[k]) for k, g in enumerate(groups)]
    group_params = [count_params(g) for g in groups]
    aux_list = list(auxes[: K - 1]) + [None] * max(0, K - 1 - len(auxes))
    aux_flops = [0 if a is None else count_flops(a, shapes[k + 1]) for k, a in enumerate(aux_list)]
    aux_params = [count_params(a) for a in aux_list]
    main_flops = sum(group_flops)
    costs = []
    for k in range(K):
        last = k == K - 1
        flops = sum(group_flops[: k + 1]) + (0 if last else aux_flops[k])
        costs.append(
            {
                "model": "main" if last else f"sub{k + 1}",
                "k": k + 1,
                "params": sum(group_params[: k + 1]) + (0 if last else aux_params[k]),
                "flops": flops,
                "flops_frac": flops / main_flops if main_flops else float("nan"),
                "group_params": group_params[k],
                "group_flops": group_flops[k],
                "aux_params": 0 if last else aux_params[k],
                "aux_flops": 0 if last else aux_flops[k],
                "has_aux": (not last) and aux_list[k] is not None,
            }
        )
    return costs


def fresh_costs(p, with_critics: bool | None = None) -> list[dict]:
    """Costs from freshly built modules (rank 0 of the distributed runtime has no stages): `p.groups` of a
    `Prepared` and, when the method has sub-models (or `with_critics`), critics built like the stages build
    them. The global RNG is left untouched."""
    cfg: Experiment = p.cfg
    K = len(p.groups)
    with_critics = p.method.submodels if with_critics is None else with_critics
    auxes: list[nn.Module | None] = [None] * (K - 1)
    if with_critics:
        with torch.random.fork_rng(devices=[]):
            auxes = [_make_head(cfg, p.shapes[k][1], p.data.num_classes, k, K) for k in range(K - 1)]
    return submodel_costs(p.groups, auxes, p.data.in_shape)


def _make_head(cfg: Experiment, shape: tuple[int, ...], num_classes: int, k: int, K: int) -> nn.Module:
    """The LCT critic's architecture for the cut after group k (from 0)."""
    return make_critic(shape, cfg.critic, num_classes, k, K - 1)


# -- tables from (EvalOutput, costs) ------------------------------------------------------------------
def _available(out: EvalOutput) -> list[int]:
    """Indices (from 0) of the groups k < K that have sub-model logits."""
    return [k for k, logits in enumerate(out.logits[:-1]) if logits is not None]


def submodel_rows(out: EvalOutput, costs: list[dict]) -> list[dict]:
    """One row per sub-model that has logits, then the main model."""
    rows = []
    for k in [*_available(out), len(out.logits) - 1]:
        c = costs[k]
        rows.append(
            {
                "model": c["model"],
                "test_acc": accuracy(out.logits[k], out.labels),
                "params": c["params"],
                "flops": c["flops"],
                "flops_frac": c["flops_frac"],
            }
        )
    return rows


def _span(ks: list[int]) -> str:
    return f"sub{ks[0] + 1}" if len(ks) == 1 else f"sub{ks[0] + 1}..sub{ks[-1] + 1}"


def ensemble_rows(out: EvalOutput, costs: list[dict]) -> list[dict]:
    """Sum of softmax outputs of the sub-models 1..K-1 (when there are two or more), and of those plus the
    main model (`ens(sub1+main)` when K = 2). Cost: the deepest group needed once, plus every critic used."""
    subs = _available(out)
    if not subs:
        return []
    K = len(out.logits)
    main_probs = F.softmax(out.logits[-1].float(), dim=1)
    main_flops = sum(c["group_flops"] for c in costs)
    sets = ([(subs, False)] if len(subs) >= 2 else []) + [(subs, True)]
    rows = []
    for ks, with_main in sets:
        total = sum(F.softmax(out.logits[k].float(), dim=1) for k in ks)
        if with_main:
            total = total + main_probs
        depth = K if with_main else ks[-1] + 1
        flops = sum(c["group_flops"] for c in costs[:depth]) + sum(costs[k]["aux_flops"] for k in ks)
        params = sum(c["group_params"] for c in costs[:depth]) + sum(costs[k]["aux_params"] for k in ks)
        rows.append(
            {
                "model": f"ens({_span(ks)}{'+main' if with_main else ''})",
                "test_acc": accuracy(total, out.labels),
                "params": params,
                "flops": flops,
                "flops_frac": flops / main_flops if main_flops else float("nan"),
            }
        )
    return rows


def progressive(out: EvalOutput, costs: list[dict], thresholds: list[float]) -> list[dict]:
    """Progressive inference: each sample exits at the first sub-model (1..K-1, then the main model) whose
    max softmax >= t; the main model always answers what is left. t = 0 exits everything at the first
    sub-model; t > 1 sends everything to the main model.

    Cost model: a sample that exits at sub-model k ran groups 1..k and every critic j <= k on the way
    (critic j had to be evaluated to decide not to exit there), so it pays sum_{j<=k} (group_j + critic_j).
    A sample that reaches the main model pays all K groups plus all K-1 critics, i.e.
    flops_frac = 1 + sum(critic flops) / main flops. Sub-models without logits are skipped (no exit, no cost).
    Per threshold: test_acc (%), flops (mean per sample), flops_frac (of the main model), and exit_<model>,
    the fraction of samples (0..1) exiting at each stage.
    """
    K = len(out.logits)
    exits = [*_available(out), K - 1]
    probs = torch.stack([F.softmax(out.logits[k].float(), dim=1) for k in exits])  # (E, N, C)
    conf, pred = probs.max(dim=2)  # (E, N)
    stage_cost = torch.tensor(
        [
            sum(c["group_flops"] for c in costs[: k + 1]) + sum(costs[j]["aux_flops"] for j in exits if j <= k)
            for k in exits
        ],
        dtype=torch.float64,
    )
    main_flops = sum(c["group_flops"] for c in costs)
    n = len(out.labels)
    rows = []
    for t in thresholds:
        ok = conf >= t
        ok[-1] = True  # the main model always answers
        first = ok.float().argmax(dim=0)  # index of the first stage that is confident enough
        chosen = pred.gather(0, first[None]).squeeze(0)
        flops = stage_cost[first].mean().item()
        row = {
            "threshold": float(t),
            "test_acc": percent_correct(chosen, out.labels),
            "flops": flops,
            "flops_frac": flops / main_flops if main_flops else float("nan"),
        }
        for e, k in enumerate(exits):
            row[f"exit_{costs[k]['model']}"] = (first == e).sum().item() / max(n, 1)
        rows.append(row)
    return rows


def structural_tables(out: EvalOutput, costs: list[dict], thresholds: list[float]) -> dict[str, list[dict]]:
    """The three tables from an evaluation output and the costs alone ({} for sequence outputs, where an
    exit per token has no meaning)."""
    if out.logits[-1] is None or out.logits[-1].dim() != 2:
        return {}
    return {
        "submodels": submodel_rows(out, costs),
        "ensembles": ensemble_rows(out, costs),
        "progressive": progressive(out, costs, thresholds),
    }


def write_tables(tables: dict[str, list[dict]], run_dir: Path) -> list[Path]:
    """<name>.csv (and .md) in run_dir for every non-empty table."""
    from lctrun.reporting.tables import write_table

    paths = []
    for name, rows in tables.items():
        if rows:
            paths += write_table(pd.DataFrame(rows), Path(run_dir) / name)
    return paths


# -- probe heads for BP cuts --------------------------------------------------------------------------
def probe_heads(
    groups: list[nn.Module], data: DataBundle, cfg: Experiment, epochs: int = 1, lr: float = 1e-3
) -> list[nn.Module]:
    """Classifier heads (the LCT critic's architecture, cfg.critic) trained with Adam on the frozen features
    after each cut k < K of a trained network (features in eval mode, no grad). Returns K-1 heads, each on
    its group's device, in eval mode. The groups are left unchanged (and in their previous mode)."""
    K = len(groups)
    if K < 2:
        return []
    devices = [_device_of(g) for g in groups]
    shapes = _chain_shapes(groups, data.in_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        heads = [_make_head(cfg, shapes[k + 1], data.num_classes, k, K).to(devices[k]) for k in range(K - 1)]
    heads = [to_memory_format(h, cfg.memory_format) for h in heads]
    opts = [torch.optim.Adam(h.parameters(), lr=lr) for h in heads]
    loader = train_loader(data, cfg.data.batch_size, cfg.seed + 1, devices[0], memory_format=cfg.memory_format)
    modes = [g.training for g in groups]
    for g in groups:
        g.eval()
    try:
        for epoch in range(1, epochs + 1):
            loader.set_epoch(epoch)
            for head in heads:
                head.train()
            for batch in loader:
                h = batch.x
                for k, head in enumerate(heads):
                    with autocast(cfg.precision, devices), torch.no_grad():
                        h = groups[k](h.to(devices[k]))
                    with autocast(cfg.precision, devices):
                        loss = F.cross_entropy(head(h).float(), batch.y.to(devices[k]))
                    opts[k].zero_grad(set_to_none=True)
                    loss.backward()
                    opts[k].step()
    finally:
        for g, mode in zip(groups, modes, strict=True):
            g.train(mode)
    for head in heads:
        head.eval()
    return heads


@torch.no_grad()
def evaluate_submodels(groups: list[nn.Module], auxes: list[nn.Module | None], loader: TensorLoader) -> EvalOutput:
    """Logits of sub-model k (groups 1..k + auxes[k]) and of the main model over `loader`, in eval mode."""
    mods = [*groups, *[a for a in auxes if a is not None]]
    modes = [m.training for m in mods]
    for m in mods:
        m.eval()
    K = len(groups)
    labels, logits = [], [[] for _ in groups]
    try:
        for batch in loader:
            h = batch.x
            for k, g in enumerate(groups):
                h = g(h.to(_device_of(g)))
                if k == K - 1:
                    logits[k].append(h.float().cpu())
                elif k < len(auxes) and auxes[k] is not None:
                    logits[k].append(auxes[k](h).float().cpu())
            labels.append(batch.y.cpu())
    finally:
        for m, mode in zip(mods, modes, strict=True):
            m.train(mode)
    return EvalOutput(torch.cat(labels), [torch.cat(parts) if parts else None for parts in logits])


# -- glue for the training loop -----------------------------------------------------------------------
def structural_report(p, runtime, test_loader: TensorLoader, run_dir: Path, thresholds: list[float]):
    """At the end of a serial run: evaluate sub-models (BP with K > 1: probe heads trained first on the same
    cuts), build the three tables, write submodels/ensembles/progressive .csv (+ .md) into run_dir and
    return them as {name: rows}. A runtime that holds one group only (distributed) is evaluated as is (no probe
    heads) and costed with `fresh_costs`; only its main process writes and returns tables."""
    stages = runtime.stages
    if len(stages) < len(p.groups):  # distributed: logits gathered on rank 0, costs from freshly built modules
        out = runtime.evaluate(test_loader)
        if not runtime.is_main or out is None:
            return {}
        tables = structural_tables(out, fresh_costs(p, with_critics=bool(_available(out))), thresholds)
        write_tables(tables, run_dir)
        return tables
    groups = [s.group for s in stages]
    K = len(groups)
    if p.method.name == "bp" and K > 1:
        # a critic's budget (Adam at critic.lr, a step per batch of every epoch): table 4 sets them side by side
        auxes: list[nn.Module | None] = probe_heads(groups, p.data, p.cfg, p.cfg.epochs, p.cfg.critic.lr)
        with autocast_of(stages):
            out = evaluate_submodels(groups, auxes, test_loader)
    else:
        out = runtime.evaluate(test_loader)
        # only auxiliary modules that produced logits are classifiers (a dni synthesizer is not)
        auxes = [s.aux if out.logits[k] is not None else None for k, s in enumerate(stages[:-1])]
    costs = submodel_costs(groups, auxes, p.data.in_shape)
    tables = structural_tables(out, costs, thresholds)
    write_tables(tables, run_dir)
    return tables
