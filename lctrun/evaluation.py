"""Test metrics from a runtime's evaluation output: the model, and every sub-model it has."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lctrun.runtime.base import EvalOutput


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def test_metrics(out: EvalOutput) -> dict[str, float]:
    main = out.logits[-1]
    metrics = {"test_loss": F.cross_entropy(main, out.labels).item(), "test_acc": accuracy(main, out.labels)}
    for k, logits in enumerate(out.logits[:-1]):
        if logits is not None:
            metrics[f"g{k + 1}_test_acc"] = accuracy(logits, out.labels)
    return metrics
