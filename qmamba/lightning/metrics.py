"""Language-model metrics accumulated over a whole split: token-weighted perplexity (torchmetrics ``Perplexity``, the
exponential of the mean negative log-likelihood over every target token, not a mean of batch perplexities) and bits
per byte (the same total log-likelihood divided by the UTF-8 bytes the targets stand for)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torchmetrics import SumMetric
from torchmetrics.text import Perplexity

from qmamba.data import IGNORE_INDEX


class LMMetrics(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.perplexity = Perplexity(ignore_index=IGNORE_INDEX)
        self.tokens = SumMetric()
        self.bytes = SumMetric()

    def update(self, logits: torch.Tensor, targets: torch.Tensor, nbytes: torch.Tensor) -> None:
        """logits (B, L, V_padded), targets (B, L) with IGNORE_INDEX for padding, nbytes (B,)."""
        self.perplexity.update(logits[..., : self.vocab_size].float(), targets)
        self.tokens.update((targets != IGNORE_INDEX).sum().double())
        self.bytes.update(nbytes.double().sum())

    def compute(self) -> dict[str, float]:
        ppl = float(self.perplexity.compute())
        tokens, nbytes = float(self.tokens.compute()), float(self.bytes.compute())
        loss = math.log(ppl)
        return {"loss": loss, "ppl": ppl, "bpb": loss * tokens / nbytes / math.log(2), "tokens": tokens,
                "bytes": nbytes}

    def reset(self) -> None:
        for m in (self.perplexity, self.tokens, self.bytes):
            m.reset()
