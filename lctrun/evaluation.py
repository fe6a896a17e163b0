"""Test metrics from a runtime's evaluation output: the model, and every sub-model it has."""

from __future__ import annotations

import math

import torch

from lctrun.methods.base import per_sample_loss
from lctrun.runtime.base import EvalOutput


def percent_correct(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (predictions == labels).float().mean().item()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """% correct; sequence logits (N, T, C) with labels (N, T): % of correct tokens."""
    return percent_correct(logits.argmax(-1), labels)


def test_metrics(out: EvalOutput) -> dict[str, float]:
    main = out.logits[-1]
    loss = per_sample_loss(main, out.labels).mean().item()  # sequences: mean token loss
    metrics = {"test_loss": loss, "test_acc": accuracy(main, out.labels)}
    if main.dim() == 3:
        metrics["test_ppl"] = math.exp(loss)
    for k, logits in enumerate(out.logits[:-1]):
        if logits is not None:
            metrics[f"g{k + 1}_test_acc"] = accuracy(logits, out.labels)
            if logits.dim() == 3:
                metrics[f"g{k + 1}_test_ppl"] = math.exp(per_sample_loss(logits, out.labels).mean().item())
    return metrics
