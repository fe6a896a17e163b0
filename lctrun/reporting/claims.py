"""The papers' qualitative claims as checks over a table's values, ours and the published ones.

A claim in a table YAML:

    - claim: "LC(1) is within 2 points of bp"
      check: "{LC(1)} >= {bp} - 2"

`{label}` is the test accuracy of that run's final row, `{label|item}` of one of its rows (a sub-model, an
ensemble, a threshold) and `{label|item|column}` any measured column. A check is arithmetic (+ - * /,
abs, min, max), comparisons and and/or over those values: nothing else is evaluated. It is checked twice:
on our values (means over seeds) and on the paper's, where the paper has every value it needs.

Our verdict counts only on converged runs (docs/methods.md section 10, "Convergence"): a run has converged
when its test-accuracy curve, averaged over the seeds epoch by epoch, moves by less than 0.3 points
(max - min) over its last 3 epochs (`last3_move`). A row of a run's sub-models, ensembles or progressive
thresholds takes its run's main-model curve. A claim that uses a run that has not converged, or whose
movement was not measured (fewer than 3 epochs), is "provisional (would hold|fail; <run> moved <x>)", and
its `provisional_rows` name those runs. The paper's verdict is unaffected.
"""

from __future__ import annotations

import ast
import math
import operator
import re

import pandas as pd

from lctrun.errors import ConfigError

REF = re.compile(r"\{([^{}|]+)(?:\|([^{}|]*))?(?:\|([^{}|]+))?\}")
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
COMPARE = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge}
CALLS = {"abs": abs, "min": min, "max": max}
CONVERGED_BELOW = 0.3  # points of test accuracy
LAST_EPOCHS = 3


def last3_move(curves: list[dict[int, float]]) -> float:
    """The convergence figure of one run: its seeds' test-accuracy curves ({epoch: test_acc}, one per seed)
    averaged epoch by epoch, then max - min of that mean over the run's last 3 epochs. NaN (not measured)
    when the run has fewer than 3 epochs, or a seed has no test accuracy in one of them."""
    last = max((max(c, default=0) for c in curves), default=0)
    epochs = range(last - LAST_EPOCHS + 1, last + 1)
    if last < LAST_EPOCHS or any(e not in c for c in curves for e in epochs):
        return math.nan
    mean = [sum(c[e] for c in curves) / len(curves) for e in epochs]
    return max(mean) - min(mean)


def converged(move: float) -> str:
    """Whether a run converged: "yes" (it moved less than 0.3 points), "no", or "not measured" (NaN)."""
    if move is None or math.isnan(move):
        return "not measured"
    return "yes" if move < CONVERGED_BELOW else "no"


def _movement(move: float) -> str:
    return "not measured" if converged(move) == "not measured" else f"{move:.2f}"


def references(check: str) -> list[tuple[str, str, str]]:
    """(run label, item, column) of every {...} in a check."""
    return [
        (label.strip(), (item or "").strip(), (column or "test_acc").strip())
        for label, item, column in REF.findall(check)
    ]


def _expression(check: str) -> tuple[ast.Expression, int]:
    """The check with its references replaced by v0, v1, ... (parsed), and how many there are."""
    count = iter(range(10**6))
    text = REF.sub(lambda _: f"v{next(count)}", check)
    return ast.parse(text, mode="eval"), next(count)


def _evaluate(node: ast.AST, values: list[float]):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, values)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.Name) and re.fullmatch(r"v\d+", node.id):
        return values[int(node.id[1:])]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, values)
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        return BINARY[type(node.op)](_evaluate(node.left, values), _evaluate(node.right, values))
    if isinstance(node, ast.BoolOp):
        results = [_evaluate(v, values) for v in node.values]
        return all(results) if isinstance(node.op, ast.And) else any(results)
    if isinstance(node, ast.Compare) and all(type(op) in COMPARE for op in node.ops):
        left = _evaluate(node.left, values)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = _evaluate(right_node, values)
            if not COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in CALLS and not node.keywords:
        return CALLS[node.func.id](*(_evaluate(a, values) for a in node.args))
    raise ValueError(ast.unparse(node))


def check_claim_spec(spec, labels: list[str], where: str) -> dict:
    """A claim from a table file, refused in one line if it names an unknown run or is not a check."""
    if not isinstance(spec, dict) or set(spec) != {"claim", "check"}:
        raise ConfigError(f"{where}: a claim is a mapping with exactly the keys claim and check")
    refs = references(spec["check"])
    if not refs:
        raise ConfigError(f"{where}: check {spec['check']!r} names no run ({{label}}, {{label|item}})")
    for label, _, _ in refs:
        if label not in labels:
            raise ConfigError(f"{where}: check names run '{label}', which is not a run label ({', '.join(labels)})")
    try:
        expr, n = _expression(spec["check"])
        result = _evaluate(expr, [1.0] * n)
    except (SyntaxError, ValueError) as e:
        raise ConfigError(f"{where}: check {spec['check']!r} is not a comparison of values ({e})") from None
    if not isinstance(result, bool):
        raise ConfigError(f"{where}: check {spec['check']!r} compares nothing (it needs <, <=, > or >=)")
    return dict(spec)


def verdict(check: str, lookup) -> tuple[str, str]:
    """("holds" | "fails" | "n/a", the values it used) for one check, values from lookup(label, item, column)."""
    refs = references(check)
    values = [lookup(*ref) for ref in refs]
    named = dict(zip(refs, values, strict=True))  # a value named twice is shown once
    shown = ", ".join(
        f"{label}{' ' + item if item else ''}{'' if col == 'test_acc' else ' ' + col} {_fmt(v)}"
        for (label, item, col), v in named.items()
    )
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return "n/a", shown
    expr, _ = _expression(check)
    return ("holds" if _evaluate(expr, [float(v) for v in values]) else "fails"), shown


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def evaluate_claims(table, rows: list[dict], published_value, moves: dict[str, float] | None = None):
    """One line per claim: the claim, its check, the paper's values and verdict, ours and our verdict, and
    provisional_rows. published_value(run, item, column): the paper's value, or None. moves: each run label's
    last3_move; with it, a verdict that uses a run that has not converged (a label missing from moves counts
    as not measured) is provisional. None when the table has no claims."""
    if not table.claims:
        return None
    runs = {r.label: r for r in table.runs}

    def ours(label, item, column):
        row = next((r for r in rows if r["run"] == label and r["item"] == item), None)
        if row is None and item == "":
            row = next((r for r in rows if r["run"] == label and r["item"] == "main"), None)
        if row is None or column not in row:
            return None
        std = row.get(f"{column} std")
        return row[column] if std is None else _Spread(row[column], std)

    def paper(label, item, column):
        value = published_value(runs[label], item, column)
        return value if isinstance(value, (int, float)) else None

    out = []
    for claim in table.claims:
        paper_verdict, paper_values = verdict(claim["check"], paper)
        our_verdict, our_values = verdict(claim["check"], ours)
        used = dict.fromkeys(label for label, _, _ in references(claim["check"]))
        moving = {} if moves is None else {k: moves.get(k, math.nan) for k in used}
        moving = {k: m for k, m in moving.items() if converged(m) != "yes"}
        if moving and our_verdict != "n/a":
            would = {"holds": "would hold", "fails": "would fail"}[our_verdict]
            rows_moved = ", ".join(
                f"{k} not measured" if converged(m) == "not measured" else f"{k} moved {m:.2f}"
                for k, m in moving.items()
            )
            our_verdict = f"provisional ({would}; {rows_moved})"
        out.append(
            {
                "claim": claim["claim"],
                "check": claim["check"],
                "paper": paper_verdict,
                "paper's values": paper_values,
                "ours": our_verdict,
                "our values": our_values,
                "provisional_rows": "; ".join(f"{k}={_movement(m)}" for k, m in moving.items()),
            }
        )
    return pd.DataFrame(out)


class _Spread(float):
    """A mean that prints with its spread over seeds."""

    def __new__(cls, mean: float, std: float):
        value = super().__new__(cls, mean)
        value.std = std
        return value

    def __format__(self, spec: str) -> str:
        return f"{float(self):{spec}} ± {self.std:.2g}"
