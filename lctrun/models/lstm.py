"""LSTM models as ChainModels: an input block, a BlockSequence of single-layer LSTM blocks, and a head.

Every block maps one tensor to one tensor, (B, T, D) -> (B, T, H), so the model can be cut between
any two blocks (docs/methods.md section 3, RNN case: lower group = embedding + LSTM layer, upper group =
LSTM layer + decoder). Each LSTM block starts from a zero hidden and cell state on every forward
call: no state is carried across batches (truncated BPTT over a stream, as in the classic PTB
recipe, would need the state to cross batch and group boundaries; here a batch is a set of
independent windows).

Models:
    lstm-seq  sequential MNIST: a (C, H, W) image is read row by row, H steps of C*W features;
              `embed` projects each row, the head classifies from the last step.
    lstm-lm   word-level language model: `embed` is a token embedding, the head decodes every step
              to the vocabulary. Its blocks carry `per_step = True`, which tells the local critics
              (lct, dgl) to predict every token too. Embedding and decoder weights are not tied:
              tying would share a parameter between the first and the last group.
"""

from __future__ import annotations

import torch
from torch import nn

from lctrun.models.chain import BlockSequence, ChainModel


class RowProjection(nn.Module):
    """(B, C, H, W) images -> (B, H, D): row h is the step-h input, C*W features projected to D."""

    def __init__(self, row_features: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(row_features, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            b, c, h, w = x.shape
            x = x.permute(0, 2, 1, 3).reshape(b, h, c * w)
        return self.proj(x)


class TokenEmbedding(nn.Module):
    """(B, T) token ids -> (B, T, D). Ids arriving as floats (loaders and dry runs make floats) are cast back."""

    def __init__(self, vocab: int, dim: int, dropout: float = 0.0):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.drop = nn.Dropout(dropout)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.embedding(x.long()))


class LSTMBlock(nn.Module):
    """One LSTM layer, (B, T, D) -> (B, T, H); the state starts at zero for every batch."""

    def __init__(self, in_dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.lstm = nn.LSTM(in_dim, hidden, batch_first=True)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)  # (h0, c0) default to zeros
        return self.drop(out)


class SequenceHead(nn.Module):
    """Linear to classes: from the last step (sequence classification) or at every step (language model)."""

    def __init__(self, hidden: int, num_classes: int, per_step: bool):
        super().__init__()
        self.last_only = not per_step
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x[:, -1] if self.last_only else x)


def lstm_seq(num_classes: int, in_shape: tuple[int, ...], layers: int = 2, hidden: int = 128) -> ChainModel:
    """Sequential (row-by-row) image classifier: in_shape (C, H, W) -> H steps of C*W features."""
    if len(in_shape) == 3:
        c, _, w = in_shape
        features = c * w
    else:  # (T, D) sequences of real vectors
        features = in_shape[-1]
    return ChainModel(
        dict(
            embed=RowProjection(features, hidden),
            lstm=BlockSequence(*[LSTMBlock(hidden, hidden) for _ in range(layers)]),
            head=SequenceHead(hidden, num_classes, per_step=False),
        )
    )


def lstm_lm(
    num_classes: int,
    in_shape: tuple[int, ...],
    layers: int = 2,
    embed: int = 200,
    hidden: int = 200,
    dropout: float = 0.2,
) -> ChainModel:
    """Word-level LM: num_classes = vocabulary size, in_shape = (T,) token ids; logits (B, T, vocab)."""
    model = ChainModel(
        dict(
            embed=TokenEmbedding(num_classes, embed, dropout),
            lstm=BlockSequence(*[LSTMBlock(embed if i == 0 else hidden, hidden, dropout) for i in range(layers)]),
            head=SequenceHead(hidden, num_classes, per_step=True),
        )
    )
    for _, block in model.named_blocks():
        block.per_step = True  # every step has a target: critics classify per token
    return model
