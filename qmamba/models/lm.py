"""Residual block, backbone and LM head. Module names match mamba_ssm's ``MambaLMHeadModel`` exactly:
``backbone.embedding``, ``backbone.layers.N.{norm,mixer}``, ``backbone.norm_f``, ``lm_head`` (tied to the embedding),
so ``state_dict()`` moves between the two unchanged."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qmamba.config import MambaConfig
from qmamba.models.mamba1 import Mamba1Mixer
from qmamba.models.mamba2 import Mamba2Mixer
from qmamba.models.parts import LayerCache, RMSNorm, linear_step

MIXERS = {"Mamba1": Mamba1Mixer, "Mamba2": Mamba2Mixer}


class Block(nn.Module):
    """Pre-norm residual block: residual += hidden; hidden = mixer(norm(residual)). The residual stream is carried
    separately (in fp32 when ``residual_in_fp32``) as in mamba_ssm."""

    emit_codes = True  # int8: hand in_proj its codes from the fused pre-norm when it takes them; False: float norm

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_epsilon)
        self.mixer = MIXERS[cfg.layer](cfg)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None, cache: LayerCache | None = None):
        normed, residual = self._pre_norm(hidden, residual, step=False)
        hidden = self.mixer(normed) if cache is None else self.mixer(normed, cache)  # with a cache: prefill
        return hidden, residual

    def step(self, hidden: torch.Tensor, residual: torch.Tensor | None, cache: LayerCache):  # (B, d_model) each
        normed, residual = self._pre_norm(hidden, residual, step=True)
        return self.mixer.step(normed, cache), residual

    def _pre_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None, step: bool):
        """(the mixer's input, the new residual). In int8 mode, where the mixer's in_proj reads its input as codes
        (``QuantLinear.takes_codes``), the residual add, the RMSNorm and in_proj's quantize run as one op
        (``ops.add_rmsnorm_quant``: one kernel on a GPU, the same math as the three ops below, DESIGN §3) and the
        mixer gets ``Codes``; elsewhere the float norm output."""
        in_proj = getattr(self.mixer, "in_proj", None)
        if self.emit_codes and hasattr(in_proj, "takes_codes") and in_proj.takes_codes("input"):
            from qmamba.ops.int8_norm import add_rmsnorm_quant
            from qmamba.qnn.codes import Codes

            scale = in_proj.input_scale(hidden, step)
            codes, residual = add_rmsnorm_quant(hidden, residual, self.norm.weight, self.norm.eps, scale,
                                                self.residual_in_fp32, backend=self.norm.backend)
            shape = hidden.shape
            return Codes(codes.reshape(shape), scale, self.norm.weight.dtype), residual.reshape(shape)
        residual = hidden if residual is None else hidden + residual
        if self.residual_in_fp32:
            residual = residual.float()
        return self.norm(residual.to(self.norm.weight.dtype)), residual


@dataclass(eq=False)
class InferenceCache:
    """The decoding state of every layer (``LayerCache``: conv and ssm state), allocated once by
    ``MambaLM.allocate_cache``. ``MambaLM.prefill`` and ``MambaLM.step`` update these tensors in place, never
    replace them, so a CUDA graph captured on one step replays on the same memory. A prefill starts a new sequence:
    it overwrites whatever the cache held."""

    layers: list[LayerCache]

    @classmethod
    def allocate(cls, model: MambaLM, batch: int, device=None, dtype: torch.dtype | None = None) -> InferenceCache:
        return model.allocate_cache(batch, device, dtype)

    @property
    def batch_size(self) -> int:
        return self.layers[0].conv_state.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for t in (layer.conv_state, layer.ssm_state)]

    def zero_(self) -> InferenceCache:
        for t in self.tensors():
            t.zero_()
        return self


class MixerModel(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, eps=cfg.norm_epsilon)

    def forward(self, input_ids: torch.Tensor, cache: InferenceCache | None = None) -> torch.Tensor:
        """(B, L) -> (B, L, d_model); with ``cache`` (prefill), also fill every layer's decoding state."""
        hidden, residual = self.embedding(input_ids), None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual) if cache is None else layer(hidden, residual, cache.layers[i])
        residual = hidden + residual
        return self.norm_f(residual.to(self.norm_f.weight.dtype))

    def step(self, input_ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:  # (B,) -> (B, d_model)
        hidden, residual = self.embedding(input_ids), None
        for layer, layer_cache in zip(self.layers, cache.layers):
            hidden, residual = layer.step(hidden, residual, layer_cache)
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

    # ---- decoding (qmamba.generation) -----------------------------------------------------------------------------
    def allocate_cache(self, batch: int, device=None, dtype: torch.dtype | None = None) -> InferenceCache:
        """A zeroed decoding cache for ``batch`` sequences. ``device`` / ``dtype`` (the activation dtype, which a float
        conv state is kept in) default to the embedding's. Allocate it after ``set_mode``: in int8 mode the conv
        state holds int8 input codes. The ssm state is fp32 whatever ``dtype``."""
        emb = self.backbone.embedding.weight
        device, dtype = device or emb.device, dtype or emb.dtype
        return InferenceCache([layer.mixer.allocate_cache(batch, device, dtype) for layer in self.backbone.layers])

    def _check_cache(self, input_ids: torch.Tensor, cache: InferenceCache) -> None:
        if not isinstance(cache, InferenceCache) or len(cache.layers) != len(self.backbone.layers):
            raise ValueError("cache must be an InferenceCache of this model: make it with model.allocate_cache(batch)")
        if input_ids.shape[0] != cache.batch_size:
            raise ValueError(f"input_ids hold {input_ids.shape[0]} sequences but the cache was allocated for "
                             f"{cache.batch_size}; allocate it with model.allocate_cache({input_ids.shape[0]})")

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, cache: InferenceCache, last_only: bool = False) -> torch.Tensor:
        """``forward`` (logits (B, L, V), or (B, 1, V) of the last position with ``last_only``) that also fills
        ``cache`` with the state after the last token, ready for ``step``."""
        self._check_cache(input_ids, cache)
        hidden = self.backbone(input_ids, cache)
        return self.lm_head(hidden[:, -1:] if last_only else hidden)

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """One token per sequence, input_ids (B,) or (B, 1) -> logits (B, V); ``cache`` advances in place. After
        ``prefill(prompt)``, the logits equal forward's on prompt + the tokens stepped so far, at the last of them."""
        input_ids = input_ids.reshape(-1)
        self._check_cache(input_ids, cache)
        return linear_step(self.lm_head, self.backbone.step(input_ids, cache))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights counted once by parameters()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, context: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``input_ids`` (B, L). ``temperature=0`` is greedy. Decodes
        with the recurrent cache (``qmamba.generation.generate``, eagerly: no CUDA graph is captured here). Only when
        the sequence outgrows ``context`` does each step rerun the model on the last ``context`` tokens instead (a
        window forgets what a recurrent state keeps)."""
        if context is None or input_ids.shape[1] + max_new_tokens - 1 <= context:
            from qmamba.generation import generate  # lazy: generation builds on this module

            return generate(self, input_ids, max_new_tokens, temperature=max(temperature, 0.0), top_k=top_k,
                            generator=generator, cuda_graph=False)
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
