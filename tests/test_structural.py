"""Structural optimisation: FLOP counts, sub-model costs, ensembles, progressive inference, BP probe heads,
and the end-of-run report."""

import math

import pandas as pd
import pytest
import torch
from rich.console import Console
from torch import nn

from lctrun.config import load_experiment
from lctrun.methods import group_shapes
from lctrun.prepared import make_loaders, make_serial_runtime, prepare
from lctrun.runtime.base import EvalOutput
from lctrun.structural import (
    count_flops,
    ensemble_rows,
    fresh_costs,
    probe_heads,
    progressive,
    structural_report,
    submodel_costs,
    submodel_rows,
)
from lctrun.train import train


def small(overrides):
    base = [
        "data.name=fake",
        "data.shape=[1,28,28]",
        "data.train_size=64",
        "data.test_size=32",
        "data.batch_size=16",
        "data.test_batch_size=32",
        "critic.channels=8",
        "model.split=[conv1,conv3]",
    ]
    return load_experiment(None, base + overrides)


# -- FLOPs and costs ----------------------------------------------------------------------------------
def test_count_flops_linear_and_conv():
    assert count_flops(nn.Linear(10, 5), (10,)) == 2 * 10 * 5
    cin, cout, k, h, w = 3, 4, 3, 8, 8
    assert count_flops(nn.Conv2d(cin, cout, k, padding=1), (cin, h, w)) == 2 * cin * cout * k * k * h * w
    conv = nn.Conv2d(cin, cout, k, padding=1)
    conv.train()
    count_flops(conv, (cin, h, w))
    assert conv.training  # the mode is restored


def toy_chain():
    groups = [nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Sequential(nn.Linear(16, 16)), nn.Linear(16, 3)]
    auxes = [nn.Linear(16, 3), nn.Linear(16, 3)]
    return groups, auxes


def test_submodel_costs():
    groups, auxes = toy_chain()
    costs = submodel_costs(groups, auxes, (8,))
    assert [c["model"] for c in costs] == ["sub1", "sub2", "main"]
    g = [2 * 8 * 16, 2 * 16 * 16, 2 * 16 * 3]
    a = [2 * 16 * 3, 2 * 16 * 3]
    assert [c["flops"] for c in costs] == [g[0] + a[0], g[0] + g[1] + a[1], sum(g)]
    assert [c["params"] for c in costs] == [8 * 16 + 16 + 51, 8 * 16 + 16 + 16 * 16 + 16 + 51, 8 * 16 + 16 + 272 + 51]
    assert costs[-1]["flops_frac"] == 1.0
    fracs = [c["flops_frac"] for c in costs]
    assert fracs == sorted(fracs) and [c["params"] for c in costs] == sorted(c["params"] for c in costs)


def test_submodel_costs_of_a_cnn_increase_with_k():
    cfg = small(["method=lct"])
    p = prepare(cfg)
    costs = fresh_costs(p)
    assert [c["model"] for c in costs] == ["sub1", "sub2", "main"]
    flops = [c["flops"] for c in costs]
    assert flops == sorted(flops) and flops[0] > 0
    assert costs[-1]["flops_frac"] == 1.0
    # conv1 of cnn-small: 1 -> 32 channels, 3x3, on 28x28 (BN, ReLU, pool not counted)
    assert costs[0]["group_flops"] == 2 * 1 * 32 * 9 * 28 * 28


# -- tables on hand-made logits -----------------------------------------------------------------------
def hand_costs():
    """Group FLOPs 10, 20, 70 (main = 100); critic FLOPs 5 and 3."""
    rows = []
    for k, (gf, af) in enumerate([(10, 5), (20, 3), (70, 0)]):
        rows.append(
            {"model": ["sub1", "sub2", "main"][k], "k": k + 1, "group_flops": gf, "aux_flops": af}
            | {"group_params": 1, "aux_params": 1 if k < 2 else 0, "params": 0, "flops": 0, "flops_frac": 0.0}
        )
    return rows


def hand_output():
    big = 10.0
    labels = torch.tensor([0, 1, 2, 0])
    # accuracies: sub1 25% (right on 0), sub2 75% (wrong on 0), main 50% (right on 0, 2)
    sub1 = torch.tensor([[big, 0, 0], [0.1, 0, 0], [0, 0.2, 0], [0, 0.3, 0]])
    sub2 = torch.tensor([[0, 5.0, 0], [0, big, 0], [0, 0, 0.1], [0.4, 0, 0]])
    main = torch.tensor([[0.5, 0, 0], [0.2, 0, 0], [0, 0, big], [0, big, 0]])
    return EvalOutput(labels, [sub1, sub2, main])


def test_submodel_rows_accuracy():
    rows = submodel_rows(hand_output(), hand_costs())
    assert [r["model"] for r in rows] == ["sub1", "sub2", "main"]
    assert [r["test_acc"] for r in rows] == [25.0, 75.0, 50.0]


def test_ensembles_by_hand():
    out = hand_output()
    rows = {r["model"]: r for r in ensemble_rows(out, hand_costs())}
    assert set(rows) == {"ens(sub1..sub2)", "ens(sub1..sub2+main)"}
    # by hand, sum of softmaxes of sub1 + sub2: sample 0: [1.0, 0.99, 0.01] -> 0 (right); sample 1: sub2's 10
    # wins -> 1 (right); sample 2: [0.62, 0.69, 0.66] -> 1 (wrong); sample 3: [0.726, 0.689, 0.585] -> 0 (right)
    assert rows["ens(sub1..sub2)"]["test_acc"] == 75.0
    # + main: samples 0, 1 unchanged (right), sample 2 -> main's 10 on class 2 (right), sample 3 -> 1 (wrong)
    assert rows["ens(sub1..sub2+main)"]["test_acc"] == 75.0
    sm = [torch.softmax(x, 1) for x in out.logits]
    assert (sm[0] + sm[1]).argmax(1).tolist() == [0, 1, 1, 0]
    assert (sm[0] + sm[1] + sm[2]).argmax(1).tolist() == [0, 1, 2, 1]
    # costs: without main, groups 1..2 + both critics; with main, all groups + both critics
    assert rows["ens(sub1..sub2)"]["flops"] == 10 + 20 + 5 + 3
    assert rows["ens(sub1..sub2+main)"]["flops_frac"] == pytest.approx(1.08)


def test_ensemble_two_groups():
    labels = torch.tensor([0, 1])
    sub1 = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    main = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    costs = [
        {"model": "sub1", "group_flops": 10, "aux_flops": 1, "group_params": 1, "aux_params": 1},
        {"model": "main", "group_flops": 10, "aux_flops": 0, "group_params": 1, "aux_params": 0},
    ]
    rows = ensemble_rows(EvalOutput(labels, [sub1, main]), costs)
    assert [r["model"] for r in rows] == ["ens(sub1+main)"]
    # sample 0: softmax(2,0)+softmax(0,1) = [0.881+0.269, 0.119+0.731] -> 0 (right); sample 1: -> 1 (right)
    assert rows[0]["test_acc"] == 100.0
    assert ensemble_rows(EvalOutput(labels, [None, main]), costs) == []


def test_progressive_inference_extremes():
    out, costs = hand_output(), hand_costs()
    subs = {r["model"]: r for r in submodel_rows(out, costs)}
    low, high = progressive(out, costs, [0.0, 1.01])
    # t = 0: every sample exits at sub-model 1, which paid group 1 + critic 1
    assert low["exit_sub1"] == 1.0 and low["exit_sub2"] == 0.0 and low["exit_main"] == 0.0
    assert low["test_acc"] == subs["sub1"]["test_acc"]
    assert low["flops_frac"] == pytest.approx((10 + 5) / 100)
    # t > 1: every sample reaches the main model and paid every group and every critic on the way:
    # flops_frac = 1 + (5 + 3) / 100
    assert high["exit_main"] == 1.0 and high["exit_sub1"] == 0.0
    assert high["test_acc"] == subs["main"]["test_acc"]
    assert high["flops_frac"] == pytest.approx(1.08)


def test_progressive_inference_mixed_exits():
    out, costs = hand_output(), hand_costs()
    (row,) = progressive(out, costs, [0.9])
    # sample 0 exits at sub1 (right), sample 1 at sub2 (right), samples 2, 3 at main (right, wrong)
    assert (row["exit_sub1"], row["exit_sub2"], row["exit_main"]) == (0.25, 0.25, 0.5)
    assert row["test_acc"] == 75.0
    assert row["flops"] == pytest.approx((15 + 38 + 108 + 108) / 4)
    assert math.isclose(row["flops_frac"], row["flops"] / 100)


# -- BP probe heads and the end-of-run report ---------------------------------------------------------
def test_probe_heads_on_a_bp_trained_cnn(tmp_path):
    cfg = small(["method=bp", "epochs=1"])
    p = prepare(cfg)
    runtime = make_serial_runtime(p)
    train(cfg, run_dir=tmp_path, console=Console(quiet=True), runtime=runtime, prepared=p)
    groups = [s.group for s in runtime.stages]
    before = [q.detach().clone() for g in groups for q in g.parameters()]
    heads = probe_heads(groups, p.data, cfg, epochs=1)
    assert len(heads) == len(groups) - 1 == 2
    shapes = group_shapes(groups, p.data.in_shape)
    for k, head in enumerate(heads):
        assert head(torch.zeros(2, *shapes[k][1])).shape == (2, p.data.num_classes)
    after = [q.detach() for g in groups for q in g.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # the groups stay frozen
    _, test_loader = make_loaders(p, p.devices[0])
    tables = structural_report(p, runtime, test_loader, tmp_path, [0.0, 1.01])
    assert [r["model"] for r in tables["submodels"]] == ["sub1", "sub2", "main"]
    assert tables["submodels"][-1]["test_acc"] == pytest.approx(main_acc(runtime, test_loader))


def adam_steps(run, monkeypatch) -> dict:
    """{optimizer: (steps, lr)} of every Adam step taken inside run()."""
    steps, step = {}, torch.optim.Adam.step

    def counted(self, *args, **kwargs):
        count, _ = steps.get(id(self), (0, None))
        steps[id(self)] = (count + 1, self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch.optim.Adam, "step", counted)
        run()
    return steps


def test_bp_probe_heads_get_the_budget_of_lcts_critics(tmp_path, monkeypatch):
    """Table 4 sets bp's sub-models beside LC's: each probe head takes as many Adam steps at critic.lr as
    lct gives each critic in the same run (2 epochs of 4 batches, update_every 1)."""
    budgets = []
    for method in ("bp", "lct"):
        cfg = small([f"method={method}", "epochs=2", "critic.lr=0.003"])
        budgets.append(
            adam_steps(
                lambda cfg=cfg: train(cfg, run_dir=tmp_path / cfg.method, console=Console(quiet=True)), monkeypatch
            )
        )
    probes, critics = (sorted(b.values()) for b in budgets)
    assert probes == critics == [(8, 0.003)] * 2


def main_acc(runtime, loader):
    out = runtime.evaluate(loader)
    return 100.0 * (out.logits[-1].argmax(1) == out.labels).float().mean().item()


def test_structural_report_on_an_lct_run(tmp_path):
    cfg = small(["method=lct", "epochs=2"])
    p = prepare(cfg)
    runtime = make_serial_runtime(p)
    train(cfg, run_dir=tmp_path, console=Console(quiet=True), runtime=runtime, prepared=p)
    _, test_loader = make_loaders(p, p.devices[0])
    thresholds = [0.0, 0.5, 0.9, 1.01]
    tables = structural_report(p, runtime, test_loader, tmp_path, thresholds)
    frames = {name: pd.read_csv(tmp_path / f"{name}.csv") for name in ("submodels", "ensembles", "progressive")}
    assert frames["submodels"]["model"].tolist() == ["sub1", "sub2", "main"]
    assert frames["ensembles"]["model"].tolist() == ["ens(sub1..sub2)", "ens(sub1..sub2+main)"]
    assert frames["progressive"]["threshold"].tolist() == thresholds
    subs = {r["model"]: r for r in tables["submodels"]}
    low, high = tables["progressive"][0], tables["progressive"][-1]
    assert low["test_acc"] == subs["sub1"]["test_acc"] and low["exit_sub1"] == 1.0
    assert high["test_acc"] == subs["main"]["test_acc"] and high["exit_main"] == 1.0
    critics = sum(s.aux is not None for s in runtime.stages)
    assert critics == 2
    costs = fresh_costs(p)  # the distributed path: costs from freshly built modules match the trained ones
    assert [c["flops"] for c in costs] == frames["submodels"]["flops"].tolist()
    assert high["flops_frac"] == pytest.approx(1 + sum(c["aux_flops"] for c in costs) / costs[-1]["flops"])

    # a runtime without stages (distributed, rank 0): the same tables from its EvalOutput and fresh costs
    class Gathered:  # the main worker of a distributed run: one stage here, every group's logits gathered
        is_main = True
        stages = runtime.stages[:1]

        def evaluate(self, loader):
            return runtime.evaluate(loader)

    assert structural_report(p, Gathered(), test_loader, tmp_path / "dist", thresholds) == tables
    assert (tmp_path / "dist" / "progressive.csv").exists()
