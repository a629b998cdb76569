"""Residual block, backbone and LM head. Module names match mamba_ssm's ``MambaLMHeadModel`` exactly:
``backbone.embedding``, ``backbone.layers.N.{norm,mixer}``, ``backbone.norm_f``, ``lm_head`` (tied to the embedding),
so ``state_dict()`` moves between the two unchanged."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qmamba.config import MambaConfig
from qmamba.models.mamba1 import Mamba1Mixer
from qmamba.models.mamba2 import Mamba2Mixer
from qmamba.models.parts import RMSNorm

MIXERS = {"Mamba1": Mamba1Mixer, "Mamba2": Mamba2Mixer}


class Block(nn.Module):
    """Pre-norm residual block: residual += hidden; hidden = mixer(norm(residual)). The residual stream is carried
    separately (in fp32 when ``residual_in_fp32``) as in mamba_ssm."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_epsilon)
        self.mixer = MIXERS[cfg.layer](cfg)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None):
        residual = hidden if residual is None else hidden + residual
        if self.residual_in_fp32:
            residual = residual.float()
        hidden = self.mixer(self.norm(residual.to(self.norm.weight.dtype)))
        return hidden, residual


class MixerModel(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, eps=cfg.norm_epsilon)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, d_model)
        hidden, residual = self.embedding(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        residual = hidden + residual
        return self.norm_f(residual.to(self.norm_f.weight.dtype))


class MambaLM(nn.Module):
    """Mamba1 / Mamba2 language model. ``forward(input_ids (B, L)) -> logits (B, L, padded_vocab_size)``."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.config = cfg
        self.backbone = MixerModel(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def _init_weights(self) -> None:
        """mamba_ssm's scheme: embedding N(0, 0.02); linear biases zero (except dt_proj.bias, which holds the dt
        init); each out_proj scaled by 1/sqrt(n_layer) so the residual stream does not grow with depth."""
        nn.init.normal_(self.backbone.embedding.weight, std=0.02)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_keep_init", False):
                nn.init.zeros_(module.bias)
            if name.endswith("mixer.out_proj"):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                with torch.no_grad():
                    module.weight /= math.sqrt(self.config.n_layer)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.backbone(input_ids))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights counted once by parameters()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, context: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``input_ids`` (B, L). ``temperature=0`` is greedy. Each step
        reruns the model on the last ``context`` tokens (a look at the model, not a fast decoder)."""
        ids = input_ids
        vocab = self.config.vocab_size
        for _ in range(max_new_tokens):
            window = ids if context is None else ids[:, -context:]
            logits = self(window)[:, -1, :vocab].float()  # never sample a padding token
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, vocab), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=generator)
            ids = torch.cat([ids, nxt], dim=1)
        return ids
