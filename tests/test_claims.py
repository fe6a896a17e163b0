"""The papers' claims as checks: parsed strictly, evaluated on ours and the paper's values, and seeds
averaged into mean ± std before they are checked; a claim on a run that has not converged is provisional."""

import math

import pytest

from lctrun.errors import ConfigError
from lctrun.reporting.claims import check_claim_spec, converged, evaluate_claims, last3_move, verdict
from lctrun.reproduce import Table, TableRun, over_seeds, published_value

LABELS = ["bp", "LC(1)", "LC(3)"]


def table(claims):
    runs = [
        TableRun("bp", [], published={"test_acc": 93.93}),
        TableRun("LC(1)", [], published={"test_acc": 92.06}),
        TableRun("LC(3)", [], rows="submodels", published={"sub1": {"test_acc": 85.24}}),
    ]
    return Table(
        name="t",
        title="t",
        source="",
        published_setting="",
        experiment=None,
        scales={},
        columns=["test_acc"],
        runs=runs,
        claims=claims,
    )


def test_a_check_holds_or_fails_on_the_values_it_names():
    values = {("bp", "", "test_acc"): 89.0, ("LC(1)", "", "test_acc"): 87.5, ("LC(3)", "sub1", "flops_frac"): 0.3}
    lookup = lambda *ref: values.get(ref)  # noqa: E731
    assert verdict("{LC(1)} >= {bp} - 2", lookup)[0] == "holds"
    assert verdict("{LC(1)} >= {bp} - 1", lookup)[0] == "fails"
    assert verdict("{LC(3)|sub1|flops_frac} < 0.5 and {LC(1)} > {bp}", lookup)[0] == "fails"
    assert verdict("max({LC(1)}, {bp}) - min({LC(1)}, {bp}) <= 1.5", lookup)[0] == "holds"
    assert verdict("abs({LC(1)} - {bp}) < 1", lookup)[0] == "fails"
    assert verdict("{LC(3)|sub2} > {bp}", lookup) == ("n/a", "LC(3) sub2 n/a, bp 89")


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"claim": "x", "check": "{nope} > 1"}, "names run 'nope', which is not a run label"),
        ({"claim": "x", "check": "{bp} + 1"}, "compares nothing"),
        ({"claim": "x", "check": "__import__('os') or {bp} > 1"}, "is not a comparison of values"),
        ({"claim": "x", "check": "1 > 0"}, "names no run"),
        ({"claim": "x"}, "exactly the keys claim and check"),
    ],
)
def test_bad_claims_are_one_line_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        check_claim_spec(spec, LABELS, "table t: claims[0]")


def test_claims_are_checked_on_the_means_over_seeds_and_on_the_paper():
    per_seed = [[{"run": "bp", "item": "", "test_acc": a}] for a in (88.0, 89.0, 90.0)]
    bp = over_seeds(per_seed)
    assert bp[0]["test_acc"] == 89.0 and bp[0]["test_acc std"] == pytest.approx(1.0) and bp[0]["seeds"] == 3
    rows = bp + [{"run": "LC(1)", "item": "", "test_acc": 86.5}, {"run": "LC(3)", "item": "sub1", "test_acc": 80.0}]
    t = table(
        [
            {"claim": "LC(1) within 2 of bp", "check": "{LC(1)} >= {bp} - 2"},
            {"claim": "sub1 above bp", "check": "{LC(3)|sub1} > {bp}"},
        ]
    )
    claims = evaluate_claims(t, rows, published_value)
    assert list(claims["paper"]) == ["holds", "fails"]  # 92.06 >= 91.93; 85.24 < 93.93
    assert list(claims["ours"]) == ["fails", "fails"]  # 86.5 < 87
    assert "bp 89 ± 1" in claims.loc[0, "our values"]


def test_a_table_file_with_a_bad_claim_or_seed_count_is_refused(tmp_path, monkeypatch):
    import lctrun.reproduce as reproduce

    monkeypatch.setattr(reproduce, "TABLES_DIR", tmp_path)
    scales = {s: {"overrides": []} for s in ("smoke", "small", "paper")}
    base = "title: t\nruns: [{label: bp, overrides: [method=bp]}]\n"
    (tmp_path / "bad-claim.yaml").write_text(base + f"scales: {scales}\nclaims: [{{claim: x, check: '{{lc}} > 1'}}]\n")
    with pytest.raises(ConfigError, match="claims\\[0\\]: check names run 'lc'"):
        reproduce.load_table("bad-claim")
    scales["small"]["seeds"] = 0
    (tmp_path / "bad-seeds.yaml").write_text(base + f"scales: {scales}\n")
    with pytest.raises(ConfigError, match="scales.small.seeds must be an integer >= 1"):
        reproduce.load_table("bad-seeds")
    scales["small"]["seeds"] = 3
    (tmp_path / "own-seeds.yaml").write_text(base + f"scales: {scales}\nseeds: {{small: 1}}\nno_claims: none stated\n")
    table = reproduce.load_table("own-seeds")
    assert table.seeds("small") == 1 and table.seeds("smoke") == 1 and table.scales["small"]["seeds"] == 3


def test_a_wide_table_is_shown_whole_in_80_columns_and_a_narrow_one_as_a_table():
    import pandas as pd
    from rich.console import Console

    from lctrun.reporting.tables import rich_table

    wide = pd.DataFrame(
        [{"run": "critic training(3)", "item": "sub1", **{f"a long column name {i}": 91.25 + i for i in range(8)}}]
    )
    console = Console(width=80, record=True, soft_wrap=True)  # as the CLI's console
    console.print(rich_table(wide, title="wide"))
    text = console.export_text()
    assert "…" not in text and max(len(line.rstrip()) for line in text.splitlines()) <= 80
    assert "critic training(3) sub1" in text and "98.25" in text  # every cell, whole
    assert all(f"column name {i}" in text.replace("\n", " ") for i in range(8))

    console = Console(width=80, record=True)
    console.print(rich_table(wide.iloc[:, :3], title="narrow"))
    assert "┏━" in console.export_text()  # fits: an ordinary table


def curve(*last: float, before: tuple[float, ...] = (50.0, 80.0)) -> dict[int, float]:
    """{epoch: test_acc}: a few early epochs (`before`), then `last`."""
    return dict(enumerate([*before, *last], start=1))


def test_convergence_is_the_movement_of_the_mean_over_seeds_curve():
    # each seed moves 0.4 over its last 3 epochs, but in opposite directions: the mean curve moves 0.1
    apart = [curve(90.0, 90.4, 90.2), curve(90.4, 90.0, 90.4)]
    assert last3_move(apart) == pytest.approx(0.1)
    assert converged(last3_move(apart)) == "yes"
    # the same per-seed movement in step: the mean moves 0.4 as well
    together = [curve(90.0, 90.4, 90.2), curve(90.0, 90.4, 90.4)]
    assert last3_move(together) == pytest.approx(0.4)
    assert converged(last3_move(together)) == "no"
    # one seed still climbing by a point, the other flat: the mean moves 0.5
    assert last3_move([curve(89.0, 89.5, 90.0), curve(90.0, 90.0, 90.0)]) == pytest.approx(0.5)
    # only the last 3 epochs count, and max - min over them (not last - first)
    assert last3_move([curve(90.0, 90.25, 90.0, before=(10.0, 60.0, 85.0))]) == pytest.approx(0.25)
    assert converged(0.3) == "no" and converged(0.2999) == "yes"  # less than 0.3 points


def test_a_run_without_three_measured_epochs_is_not_measured():
    assert math.isnan(last3_move([{1: 80.0, 2: 81.0}]))  # two epochs
    assert math.isnan(last3_move([curve(90.0, 90.0, 90.0), {1: 50.0, 2: 80.0, 3: 90.0, 5: 90.0}]))  # a gap
    assert math.isnan(last3_move([]))
    assert converged(math.nan) == "not measured" and converged(None) == "not measured"


def test_a_claim_on_a_run_that_has_not_converged_is_provisional():
    rows = [
        {"run": "bp", "item": "", "test_acc": 89.0},
        {"run": "LC(1)", "item": "", "test_acc": 86.5},
        {"run": "LC(3)", "item": "sub1", "test_acc": 80.0},
    ]
    t = table(
        [
            {"claim": "LC(1) within 2 of bp", "check": "{LC(1)} >= {bp} - 2"},
            {"claim": "sub1 below bp", "check": "{LC(3)|sub1} < {bp}"},
            {"claim": "LC(1) within 3 of bp", "check": "{LC(1)} >= {bp} - 3"},
        ]
    )
    moves = {"bp": 0.11, "LC(1)": 0.62, "LC(3)": 0.05}
    claims = evaluate_claims(t, rows, published_value, moves)
    assert claims.loc[0, "ours"] == "provisional (would fail; LC(1) moved 0.62)"
    assert claims.loc[0, "provisional_rows"] == "LC(1)=0.62"
    assert claims.loc[0, "paper"] == "holds"  # the paper's verdict does not depend on our runs
    assert claims.loc[1, "ours"] == "holds" and claims.loc[1, "provisional_rows"] == ""  # bp and LC(3) converged
    assert claims.loc[2, "ours"] == "provisional (would hold; LC(1) moved 0.62)"

    # not measured (fewer than 3 epochs, NaN, or no figure at all) is provisional too, and every such run is named
    moves = {"bp": math.nan, "LC(1)": 0.3}
    claims = evaluate_claims(t, rows, published_value, moves)
    assert claims.loc[0, "ours"] == "provisional (would fail; LC(1) moved 0.30, bp not measured)"
    assert claims.loc[0, "provisional_rows"] == "LC(1)=0.30; bp=not measured"
    assert claims.loc[1, "provisional_rows"] == "LC(3)=not measured; bp=not measured"

    # every run converged: plain verdicts
    claims = evaluate_claims(t, rows, published_value, {"bp": 0.29, "LC(1)": 0.0, "LC(3)": 0.1})
    assert list(claims["ours"]) == ["fails", "holds", "holds"] and set(claims["provisional_rows"]) == {""}


def test_a_check_with_an_item_keeps_its_cell_in_the_markdown_table():
    import pandas as pd

    from lctrun.reporting.tables import to_markdown

    lines = to_markdown(pd.DataFrame([{"check": "{LC(3)|sub1} > {bp|sub1}", "ours": "holds"}])).splitlines()
    assert lines[2] == "| {LC(3)\\|sub1} > {bp\\|sub1} | holds |"
    assert all(line.replace("\\|", "").count("|") == 3 for line in lines)  # two cells on every line
