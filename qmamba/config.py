"""Model configuration: one dataclass for Mamba1 and Mamba2 LMs, presets, and conversion to / from the
``config.json`` files of mamba_ssm (``state-spaces/mamba-130m``) and Hugging Face (``state-spaces/mamba-130m-hf``).

The field names follow mamba_ssm's ``MambaConfig`` + ``ssm_cfg`` so a config moves either way without surprises.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

LAYERS = ("Mamba1", "Mamba2")


@dataclass
class MambaConfig:
    """Shape of a Mamba language model.

    ``layer`` picks the mixer. Fields that only one mixer uses are ignored by the other (``dt_rank`` for Mamba1;
    ``headdim``, ``ngroups``, ``chunk_size`` for Mamba2). ``d_state=None`` means the mixer's default: 16 for Mamba1,
    128 for Mamba2, as in mamba_ssm.
    """

    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50277
    layer: str = "Mamba1"
    d_state: int | None = None
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"  # Mamba1: "auto" = ceil(d_model / 16)
    headdim: int = 64  # Mamba2
    ngroups: int = 1  # Mamba2: groups of heads sharing B / C
    chunk_size: int = 256  # Mamba2 SSD chunk length
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False
    rms_norm: bool = True
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.layer not in LAYERS:
            raise ValueError(f"MambaConfig.layer must be one of {LAYERS}, got {self.layer!r}")
        if self.d_state is None:
            self.d_state = 16 if self.layer == "Mamba1" else 128
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "headdim", "ngroups",
                     "chunk_size", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"MambaConfig.{name} must be a positive integer, got {value!r}")
        if self.dt_rank != "auto" and not (isinstance(self.dt_rank, int) and self.dt_rank > 0):
            raise ValueError(f"MambaConfig.dt_rank must be 'auto' or a positive integer, got {self.dt_rank!r}")
        if self.layer == "Mamba2":
            if self.d_inner % self.headdim:
                raise ValueError(f"Mamba2 needs expand*d_model ({self.d_inner}) divisible by headdim ({self.headdim})")
            if self.nheads % self.ngroups:
                raise ValueError(f"Mamba2 needs nheads ({self.nheads}) divisible by ngroups ({self.ngroups})")
        if not self.rms_norm:
            raise ValueError("only rms_norm=True is supported (every published Mamba checkpoint uses RMSNorm)")

    # ---- derived sizes -------------------------------------------------------------------------------------------
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank_value(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MambaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MambaConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    # ---- mamba_ssm config.json -----------------------------------------------------------------------------------
    def to_mamba_ssm(self) -> dict[str, Any]:
        """The ``config.json`` of mamba_ssm's ``MambaLMHeadModel`` for this model."""
        ssm_cfg: dict[str, Any] = {"layer": self.layer, "d_state": self.d_state, "d_conv": self.d_conv,
                                   "expand": self.expand, "dt_min": self.dt_min, "dt_max": self.dt_max,
                                   "dt_init_floor": self.dt_init_floor, "conv_bias": self.conv_bias, "bias": self.bias}
        if self.layer == "Mamba1":
            ssm_cfg["dt_rank"] = self.dt_rank
        else:
            ssm_cfg.update(headdim=self.headdim, ngroups=self.ngroups, chunk_size=self.chunk_size)
        return {"d_model": self.d_model, "d_intermediate": 0, "n_layer": self.n_layer, "vocab_size": self.vocab_size,
                "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": self.rms_norm,
                "residual_in_fp32": self.residual_in_fp32, "fused_add_norm": True,
                "pad_vocab_size_multiple": self.pad_vocab_size_multiple, "tie_embeddings": self.tie_embeddings}

    @classmethod
    def from_mamba_ssm(cls, cfg: dict[str, Any]) -> "MambaConfig":
        """From a mamba_ssm ``config.json`` dict. Hybrid models (attention layers, MLPs) are refused by name."""
        if cfg.get("attn_layer_idx"):
            raise ValueError("this checkpoint has attention layers (attn_layer_idx); qmamba supports pure Mamba LMs")
        if cfg.get("d_intermediate", 0):
            raise ValueError("this checkpoint has MLP blocks (d_intermediate > 0); qmamba supports pure Mamba LMs")
        ssm = dict(cfg.get("ssm_cfg") or {})
        layer = ssm.pop("layer", "Mamba1")
        kept = {k: v for k, v in ssm.items() if k in {f.name for f in dataclasses.fields(cls)}}
        return cls(d_model=cfg["d_model"], n_layer=cfg["n_layer"], vocab_size=cfg["vocab_size"], layer=layer,
                   rms_norm=cfg.get("rms_norm", True), residual_in_fp32=cfg.get("residual_in_fp32", True),
                   pad_vocab_size_multiple=cfg.get("pad_vocab_size_multiple", 8),
                   tie_embeddings=cfg.get("tie_embeddings", True), **kept)

    # ---- Hugging Face transformers config.json (MambaForCausalLM / Mamba2ForCausalLM) ---------------------------
    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "MambaConfig":
        """From a transformers ``config.json`` (model_type ``mamba`` or ``mamba2``). The vocabulary in these files is
        already padded, so no further padding is applied."""
        model_type = cfg.get("model_type")
        common = dict(d_model=cfg["hidden_size"], n_layer=cfg["num_hidden_layers"], vocab_size=cfg["vocab_size"],
                      d_state=cfg.get("state_size"), d_conv=cfg.get("conv_kernel", 4), expand=cfg.get("expand", 2),
                      conv_bias=cfg.get("use_conv_bias", True), bias=cfg.get("use_bias", False),
                      norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5),
                      residual_in_fp32=cfg.get("residual_in_fp32", True), pad_vocab_size_multiple=1,
                      tie_embeddings=cfg.get("tie_word_embeddings", True))
        if model_type == "mamba":
            return cls(layer="Mamba1", dt_rank=cfg.get("time_step_rank", "auto"), **common)
        if model_type == "mamba2":
            return cls(layer="Mamba2", headdim=cfg.get("head_dim", 64), ngroups=cfg.get("n_groups", 1),
                       chunk_size=cfg.get("chunk_size", 256), **common)
        raise ValueError(f"Hugging Face config has model_type={model_type!r}; expected 'mamba' or 'mamba2'")


def _published(d_model: int, n_layer: int, layer: str) -> MambaConfig:
    pad = 8 if layer == "Mamba1" else 16
    return MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=50277, layer=layer, pad_vocab_size_multiple=pad)


# Presets. `tiny` is for tests, `demo` for the CPU quickstart, `house-*` for the GPU (≈25M parameters each),
# the rest are the shapes of the published state-spaces checkpoints (GPT-NeoX tokenizer, vocab 50277).
_PRESETS: dict[str, Any] = {
    "tiny": lambda: MambaConfig(d_model=32, n_layer=2, vocab_size=256, d_state=8, dt_rank=4),
    "tiny-mamba2": lambda: MambaConfig(d_model=32, n_layer=2, vocab_size=256, layer="Mamba2", d_state=16, headdim=16,
                                       chunk_size=16),
    "demo": lambda: MambaConfig(d_model=128, n_layer=4, vocab_size=256),
    "demo-mamba2": lambda: MambaConfig(d_model=128, n_layer=4, vocab_size=256, layer="Mamba2", d_state=32,
                                       headdim=32, chunk_size=64),
    "house-mamba1": lambda: MambaConfig(d_model=512, n_layer=16, vocab_size=256),
    "house-mamba2": lambda: MambaConfig(d_model=512, n_layer=16, vocab_size=256, layer="Mamba2", d_state=64,
                                        headdim=64, pad_vocab_size_multiple=16),
    "mamba-130m": lambda: _published(768, 24, "Mamba1"),
    "mamba-370m": lambda: _published(1024, 48, "Mamba1"),
    "mamba-790m": lambda: _published(1536, 48, "Mamba1"),
    "mamba-1.4b": lambda: _published(2048, 48, "Mamba1"),
    "mamba-2.8b": lambda: _published(2560, 64, "Mamba1"),
    "mamba2-130m": lambda: _published(768, 24, "Mamba2"),
    "mamba2-370m": lambda: _published(1024, 48, "Mamba2"),
    "mamba2-780m": lambda: _published(1536, 48, "Mamba2"),
    "mamba2-1.3b": lambda: _published(2048, 48, "Mamba2"),
    "mamba2-2.7b": lambda: _published(2560, 64, "Mamba2"),
}
PRESETS = tuple(_PRESETS)


def preset(name: str, **overrides: Any) -> MambaConfig:
    """A preset config, with fields overridden by keyword (unknown fields are an error naming them)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    cfg = _PRESETS[name]()
    if overrides:
        cfg = MambaConfig.from_dict({**cfg.to_dict(), **overrides})
    return cfg
