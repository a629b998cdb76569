"""Quantization recipes as typed data: which tensors get quantized, with how many bits, at what granularity, and how
their scales are observed. A recipe is plain YAML / dict data and travels inside checkpoints.

Quantization points are named ``<module path>.<tensor>``, e.g. ``backbone.layers.3.mixer.in_proj.input``,
``backbone.layers.3.mixer.in_proj.weight``, ``backbone.layers.3.mixer.scan.delta``. A recipe maps glob patterns
(``fnmatch``) to specs: the first pattern matching a point wins; points matched by an ``ignores`` pattern, or by no
target, stay in floating point.

Points of one mixer (consumer-side: every quantized op quantizes its own inputs):
  Mamba1: in_proj.{input,weight}, conv1d.{input,weight}, x_proj.{input,weight}, dt_proj.{input,weight},
          scan.{u,delta,B,C,z}, out_proj.{input,weight}
  Mamba2: in_proj.{input,weight}, conv1d.{input,weight}, scan.{x,dt,B,C}, norm.z, out_proj.{input,weight}
``x_proj.input`` and ``scan.u`` observe the same tensor (the conv output u); give them the same spec so both see the
same int8 codes. ``dual_scale`` (``DualScaleSpec``: an inlier and an outlier scale) is allowed on the SSM input
``scan.u`` / ``scan.x`` only; ``x_proj.input`` stays single-scale (its GEMM cannot factor per-element scales out of
the sums).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from qmamba.quant.granularity import Granularity, PerChannel, PerTensor, granularity_from_dict

OBSERVER_KINDS = ("minmax", "percentile", "ema")
ROTATIONS = (None, "hadamard")
DUAL_SCALE_ENCODINGS = ("mask", "piecewise")
DUAL_SCALE_OUTLIER = ("absmax", "percentile")


@dataclass(frozen=True)
class ObserverSpec:
    """How an activation's clipping value is estimated during calibration."""

    kind: str = "minmax"
    alpha: float = 0.9999  # percentile
    momentum: float = 0.99  # ema

    def __post_init__(self):
        if self.kind not in OBSERVER_KINDS:
            raise ValueError(f"observer kind must be one of {OBSERVER_KINDS}, got {self.kind!r}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"percentile alpha must be in (0, 1], got {self.alpha}")

    def kwargs(self) -> dict[str, float]:
        return {"percentile": {"alpha": self.alpha}, "ema": {"momentum": self.momentum}}.get(self.kind, {})


@dataclass(frozen=True)
class DualScaleSpec:
    """Dual-scale int8 (``qmamba.quant.dual_scale``) for the SSM input only (``scan.u`` / ``scan.x``): an inlier
    scale from the ``threshold_alpha`` percentile T of |x| and an outlier scale for the values beyond it.

    encoding: "piecewise" (the default: codes above ``knee`` hold the outliers; s_in = T / knee, s_out = (A - T) /
      (127 - knee); no extra memory) or "mask" (codes + packed 1-bit outlier flags, 1/8 more memory; s_in = T / 127,
      s_out = A / 127). Measured equal in accuracy on the house models; piecewise is the default for its zero memory
      overhead and cheaper decode step (benchmarks/RESULTS.md, issue 5); mask is the control group's encoding.
    outlier: A = "absmax" (running max |x|) or "percentile" (the ``outlier_alpha`` percentile of |x|).
    equal_scales: the control group: s_in = s_out = the scale the spec's own ``observer`` gives (what the point
      would get without dual_scale), so the dual-scale code path reproduces the single-scale baseline bit for bit
      (mask encoding only: piecewise decodes outliers as knee * s + (|q| - knee) * s, which rounds differently).
    """

    encoding: str = "piecewise"
    threshold_alpha: float = 0.999
    outlier: str = "absmax"
    outlier_alpha: float = 0.99999
    knee: int = 112
    equal_scales: bool = False

    def __post_init__(self):
        if self.encoding not in DUAL_SCALE_ENCODINGS:
            raise ValueError(f"dual_scale.encoding must be one of {DUAL_SCALE_ENCODINGS}, got {self.encoding!r}")
        if self.outlier not in DUAL_SCALE_OUTLIER:
            raise ValueError(f"dual_scale.outlier must be one of {DUAL_SCALE_OUTLIER}, got {self.outlier!r}")
        if not isinstance(self.threshold_alpha, (int, float)) or not 0 < self.threshold_alpha < 1:
            raise ValueError(f"dual_scale.threshold_alpha (percentile of |x| giving the threshold) must be in (0, 1), "
                             f"got {self.threshold_alpha!r}")
        lo = self.threshold_alpha if self.outlier == "percentile" else 0.0  # unused (but sane) for absmax
        if not isinstance(self.outlier_alpha, (int, float)) or not lo < self.outlier_alpha <= 1:
            raise ValueError(f"dual_scale.outlier_alpha must be in (threshold_alpha, 1] = ({self.threshold_alpha}, 1],"
                             f" got {self.outlier_alpha!r}")
        if not isinstance(self.knee, int) or isinstance(self.knee, bool) or not 1 <= self.knee <= 126:
            raise ValueError(f"dual_scale.knee must be an int in 1..126, got {self.knee!r}")
        if not isinstance(self.equal_scales, bool):
            raise ValueError(f"dual_scale.equal_scales must be true or false, got {self.equal_scales!r}")
        if self.equal_scales and self.encoding != "mask":
            raise ValueError("dual_scale.equal_scales (the control group) needs encoding: mask — the piecewise "
                             "decode knee * s + (|q| - knee) * s does not reproduce q * s bit for bit")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DualScaleSpec":
        if not isinstance(data, dict):
            raise ValueError(f"dual_scale must be a mapping of DualScaleSpec fields (or null), got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown dual_scale field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class QuantSpec:
    """One quantized tensor: symmetric ``bits``-bit integers with scales at ``granularity``. Weights take their
    scale from the weight itself (absmax at that granularity); activations from ``observer``. ``learnable_scale``
    makes an activation scale a parameter during QAT (LSQ-style gradient). ``rotation: hadamard`` on a linear's
    input point quantizes ``H x`` and ``W H`` instead of ``x`` and ``W`` (same product; outliers spread over the
    channels first), as Quamba does for out_proj."""

    bits: int = 8
    granularity: Granularity = PerTensor()
    observer: ObserverSpec = ObserverSpec()
    learnable_scale: bool = False
    symmetric: bool = True
    rotation: str | None = None
    dual_scale: DualScaleSpec | None = None  # SSM input only (scan.u / scan.x); see DualScaleSpec

    def __post_init__(self):
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an int in 2..8, got {self.bits!r}")
        if not self.symmetric:
            raise ValueError("only symmetric quantization is supported (DESIGN §3); set symmetric: true")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        if self.dual_scale is not None:
            if not isinstance(self.dual_scale, DualScaleSpec):
                raise ValueError(f"dual_scale must be a DualScaleSpec (or its dict form), got {self.dual_scale!r}")
            if self.bits != 8:
                raise ValueError(f"dual_scale encodes int8 codes: set bits: 8 (got {self.bits})")
            if self.learnable_scale:
                raise ValueError("dual_scale with learnable_scale is not supported: set learnable_scale: false")
            if self.rotation is not None:
                raise ValueError("dual_scale applies to the SSM input, which is not rotated: remove rotation")

    def to_dict(self) -> dict[str, Any]:
        out = {"bits": self.bits, "granularity": self.granularity.to_dict(),
               "observer": dataclasses.asdict(self.observer), "learnable_scale": self.learnable_scale,
               "symmetric": self.symmetric, "rotation": self.rotation}
        if self.dual_scale is not None:  # absent otherwise: recipes (and checkpoints) without it stay as they were
            out["dual_scale"] = self.dual_scale.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantSpec":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown quantization spec field(s) {unknown}; known: {sorted(known)}")
        if isinstance(data.get("granularity"), (dict, str)):  # bare names ("per_channel") too, for YAML brevity
            data["granularity"] = granularity_from_dict(data["granularity"])
        if isinstance(data.get("observer"), dict):
            obs_known = {f.name for f in dataclasses.fields(ObserverSpec)}
            obs_unknown = sorted(set(data["observer"]) - obs_known)
            if obs_unknown:
                raise ValueError(f"unknown observer field(s) {obs_unknown}; known: {sorted(obs_known)}")
            data["observer"] = ObserverSpec(**data["observer"])
        if data.get("dual_scale") is not None and not isinstance(data["dual_scale"], DualScaleSpec):
            data["dual_scale"] = DualScaleSpec.from_dict(data["dual_scale"])
        return cls(**data)


@dataclass(frozen=True)
class Recipe:
    name: str
    targets: tuple[tuple[str, QuantSpec], ...]
    ignores: tuple[str, ...] = ()

    def spec_for(self, point: str) -> QuantSpec | None:
        """The spec of quantization point ``point`` (full dotted name), or None if it stays floating point."""
        if any(fnmatch.fnmatchcase(point, pattern) for pattern in self.ignores):
            return None
        for pattern, spec in self.targets:
            if fnmatch.fnmatchcase(point, pattern):
                return spec
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "targets": {p: s.to_dict() for p, s in self.targets},
                "ignores": list(self.ignores)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        unknown = sorted(set(data) - {"name", "targets", "ignores"})
        if unknown:
            raise ValueError(f"unknown recipe field(s) {unknown}; a recipe has name, targets, ignores")
        targets = data.get("targets") or {}
        if not isinstance(targets, dict) or not targets:
            raise ValueError("a recipe needs `targets`: a mapping from point patterns to specs")
        return cls(name=str(data.get("name", "custom")),
                   targets=tuple((str(p), QuantSpec.from_dict(s or {})) for p, s in targets.items()),
                   ignores=_patterns(data.get("ignores")))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _patterns(value) -> tuple[str, ...]:
    """``ignores`` as a tuple of patterns; a single string is one pattern (not one pattern per character)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


# ---- presets ---------------------------------------------------------------------------------------------------------
W8 = QuantSpec()
A8 = QuantSpec()
A8_PERCENTILE = QuantSpec(observer=ObserverSpec("percentile", alpha=0.9995))
A8_PERCENTILE_M1 = QuantSpec(observer=ObserverSpec("percentile", alpha=0.9999))  # chosen on validation, RESULTS.md
A8_ROTATED = QuantSpec(rotation="hadamard")

_MAMBA1_POINTS = ("in_proj.input", "conv1d.input", "dt_proj.input", "scan.delta", "scan.B", "scan.C", "scan.z",
                  "out_proj.input")
_WEIGHTS = ("in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight", "out_proj.weight")


def _targets(items: dict[str, QuantSpec]) -> tuple[tuple[str, QuantSpec], ...]:
    return tuple((f"*.mixer.{point}", spec) for point, spec in items.items())


def quamba_w8a8() -> Recipe:
    """Quamba's Mamba1 W8A8: static per-tensor scales everywhere; the SSM input u (x_proj / scan input) clipped at
    a percentile, the out_proj input quantized after a Hadamard rotation, the other activations at their min-max."""
    items = {p: A8 for p in _MAMBA1_POINTS} | {p: W8 for p in _WEIGHTS}
    items |= {"x_proj.input": A8_PERCENTILE_M1, "scan.u": A8_PERCENTILE_M1, "out_proj.input": A8_ROTATED}
    return Recipe("quamba_w8a8", _targets(items), ignores=("lm_head.*", "backbone.embedding.*"))


def quamba2_w8a8() -> Recipe:
    """Quamba2-style Mamba2 W8A8: per-tensor static scales, with the SSM input x scaled per head and B / C per
    SSD group (their channel axis is dim -2 of (batch, L, heads|groups, ...)), the out_proj input rotated."""
    items = {p: A8 for p in ("in_proj.input", "conv1d.input", "scan.dt", "norm.z")}
    items |= {"out_proj.input": A8_ROTATED}
    items |= {p: W8 for p in ("in_proj.weight", "conv1d.weight", "out_proj.weight")}
    items |= {"scan.x": QuantSpec(granularity=PerChannel(axis=-2), observer=ObserverSpec("percentile", 0.9995)),
              "scan.B": QuantSpec(granularity=PerChannel(axis=-2)),
              "scan.C": QuantSpec(granularity=PerChannel(axis=-2))}
    return Recipe("quamba2_w8a8", _targets(items), ignores=("lm_head.*", "backbone.embedding.*"))


def qat_w8a8() -> Recipe:
    """W8A8 for QAT on either mixer: per-output-channel weights (their scales follow the weights as they train),
    activations calibrated like the PTQ recipes (out_proj input rotated), then learned (LSQ)."""
    learn = QuantSpec(learnable_scale=True)
    learn_pct = QuantSpec(learnable_scale=True, observer=ObserverSpec("percentile", alpha=0.9995))
    weight = QuantSpec(granularity=PerChannel(axis=0))
    items = {p: learn for p in _MAMBA1_POINTS + ("scan.dt", "norm.z")}
    items |= {"x_proj.input": learn_pct, "scan.u": learn_pct, "scan.x": learn_pct,
              "out_proj.input": QuantSpec(learnable_scale=True, rotation="hadamard")}
    items |= {p: weight for p in _WEIGHTS}
    return Recipe("qat_w8a8", _targets(items), ignores=("lm_head.*", "backbone.embedding.*"))


_PRESETS = {"quamba_w8a8": quamba_w8a8, "quamba2_w8a8": quamba2_w8a8, "qat_w8a8": qat_w8a8}
RECIPE_PRESETS = tuple(_PRESETS)


def load_recipe(source: str | dict | Recipe) -> Recipe:
    """A recipe from a preset name, a YAML file path, a dict, or a Recipe."""
    if isinstance(source, Recipe):
        return source
    if isinstance(source, dict):
        return Recipe.from_dict(source)
    if source in _PRESETS:
        return _PRESETS[source]()
    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise FileNotFoundError(f"recipe file {path} does not exist")
        return Recipe.from_dict(yaml.safe_load(path.read_text()))
    raise ValueError(f"unknown recipe {source!r}; use a preset ({', '.join(RECIPE_PRESETS)}) or a .yaml file")
