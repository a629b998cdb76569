"""Observers: modules that watch a tensor during calibration and turn what they saw into a clipping value and a scale.

Their statistics are buffers, sized at construction from ``granularity.stat_shape(channels)``, so they live in the
state_dict: a resumed run loads them before seeing any data, and a checkpoint carries them. Buffers keep their dtype
under ``model.to(torch.bfloat16)`` / ``.half()`` (statistics in low precision would be useless).

    obs = PercentileObserver(alpha=0.9999, name="backbone.layers.3.mixer.x_proj.input")
    for batch in calib: obs(x)          # returns x unchanged
    obs.sync_()                         # under DDP: every rank ends with identical buffers
    scale = obs.scale(bits=8)           # stat_shape, fp32, > 0

Kinds: "minmax" (running max |x|), "ema" (EMA of each batch's max |x|), "percentile" (the alpha-quantile of |x| from
a streaming histogram; never keeps activations).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qmamba.quant.granularity import Granularity, PerTensor, _norm_axis, granularity_from_dict
from qmamba.quant.numerics import check_scale, scale_from_absmax


def _dist_world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class Observer(nn.Module):
    """Base observer. Subclasses implement ``_update(x)`` (x: fp32, non-empty, finite), ``_absmax()``, ``_sync(world)``
    and ``_reset()``.

    granularity: which elements share a statistic (PerTensor / PerChannel / PerGroup, or its dict form).
    channels: size of the granularity's channel axis (ignored for PerTensor); fixes the buffer shapes.
    name: the quantization point, e.g. "backbone.layers.3.mixer.x_proj.input"; errors name it.
    """

    def __init__(self, granularity: Granularity | dict = PerTensor(), channels: int = 1, name: str = ""):
        super().__init__()
        self.granularity = granularity_from_dict(granularity)
        self.channels = int(channels)
        self.name = name
        self.stat_shape = self.granularity.stat_shape(self.channels)
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.int64))

    # -- public API --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self._check_input(x)
            if x.numel() > 0:
                self._update(x.detach().float())
                self.num_batches += 1
        return x

    def absmax(self) -> torch.Tensor:
        """The clipping value (stat_shape, fp32): |x| beyond it saturates to qmin / qmax."""
        self._require_data()
        return self._absmax()

    def scale(self, bits: int = 8) -> torch.Tensor:
        """``scale_from_absmax(absmax(), bits)``: stat_shape, fp32, > 0."""
        return check_scale(scale_from_absmax(self.absmax(), bits), f"observer {self._label()}")

    def sync_(self) -> Observer:
        """Under torch.distributed with world_size > 1, reduce the statistics so every rank holds identical buffers
        (a collective: every rank must call it, on the same observers in the same order). Idempotent: calling it
        again without new data changes nothing. No-op in a single process."""
        world = _dist_world()
        if world > 1:
            with torch.no_grad():
                self._sync(world)
                # Batches per rank (ranks see equal shares under a DistributedSampler); MAX keeps it idempotent.
                dist.all_reduce(self.num_batches, op=dist.ReduceOp.MAX)
        return self

    def reset_(self) -> Observer:
        with torch.no_grad():
            self.num_batches.zero_()
            self._reset()
        return self

    # -- helpers -----------------------------------------------------------------------------------------------
    def _label(self) -> str:
        return repr(self.name) if self.name else "<unnamed>"

    def _require_data(self) -> None:
        if int(self.num_batches) == 0:
            raise RuntimeError(f"observer {self._label()} saw no data: run calibration first, or the calibration set "
                               f"is empty (check the calibration dataloader / number of calibration batches)")

    def _check_input(self, x: torch.Tensor) -> None:
        if not x.is_floating_point():
            raise TypeError(f"observer {self._label()}: expected a floating-point tensor, got {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            n_nan = int(torch.isnan(x).sum())
            n_inf = int(torch.isinf(x).sum())
            what = " and ".join(w for w, n in (("NaN", n_nan), ("inf", n_inf)) if n)
            counts = ", ".join(f"{n} {w}" for w, n in (("NaN", n_nan), ("inf", n_inf)) if n)
            raise ValueError(f"observer {self._label()}: {what} in calibration batch {int(self.num_batches) + 1} "
                             f"({counts} of {x.numel()} values, shape {tuple(x.shape)}); the fp model produces "
                             f"non-finite activations at this point: check the input data and the fp checkpoint")
        if not isinstance(self.granularity, PerTensor):
            a = _norm_axis(self.granularity.axis, x.ndim, f"observer {self._label()}")
            if x.shape[a] != self.channels:
                raise ValueError(f"observer {self._label()}: built for {self.channels} channels on axis "
                                 f"{self.granularity.axis}, got a tensor of shape {tuple(x.shape)}")

    def _apply(self, fn, recurse=True):
        # Statistics keep their dtype through .to(dtype) / .half() / bf16-true precision (low-precision statistics
        # would be useless, and a rounded histogram count wrong); only the device may change.
        def keep_dtype(t):
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(device=out.device)

        return super()._apply(keep_dtype, recurse)

    def extra_repr(self) -> str:
        return f"name={self._label()}, granularity={self.granularity}, channels={self.channels}"

    # -- subclass hooks ----------------------------------------------------------------------------------------
    def _update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _absmax(self) -> torch.Tensor:
        raise NotImplementedError

    def _sync(self, world: int) -> None:
        raise NotImplementedError

    def _reset(self) -> None:
        raise NotImplementedError


class MinMaxObserver(Observer):
    """Running max of |x| per statistic (plus the signed min / max, for reports). DDP: MAX (MIN for the min)."""

    def __init__(self, granularity: Granularity | dict = PerTensor(), channels: int = 1, name: str = ""):
        super().__init__(granularity, channels, name)
        self.register_buffer("max_abs", torch.zeros(self.stat_shape))
        self.register_buffer("min_val", torch.full(self.stat_shape, float("inf")))
        self.register_buffer("max_val", torch.full(self.stat_shape, float("-inf")))

    def _update(self, x):
        lo, hi = self.granularity.min_max(x)
        self.min_val.copy_(torch.minimum(self.min_val, lo))
        self.max_val.copy_(torch.maximum(self.max_val, hi))
        self.max_abs.copy_(torch.maximum(self.max_abs, torch.maximum(lo.abs(), hi.abs())))

    def _absmax(self):
        return self.max_abs.clone()

    def _sync(self, world):
        dist.all_reduce(self.max_abs, op=dist.ReduceOp.MAX)
        dist.all_reduce(self.max_val, op=dist.ReduceOp.MAX)
        dist.all_reduce(self.min_val, op=dist.ReduceOp.MIN)

    def _reset(self):
        self.max_abs.zero_()
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))


class EMAObserver(Observer):
    """EMA of each batch's max |x|: ``ema = momentum * ema + (1 - momentum) * batch_absmax`` (the first batch sets it).

    DDP: the mean over the ranks that saw data (SUM / count), so a rank with no batches does not pull it to 0.
    """

    def __init__(self, granularity: Granularity | dict = PerTensor(), channels: int = 1, name: str = "",
                 momentum: float = 0.99):
        super().__init__(granularity, channels, name)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"EMAObserver: momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.register_buffer("ema", torch.zeros(self.stat_shape))

    def _update(self, x):
        batch = self.granularity.absmax(x)
        if int(self.num_batches) == 0:
            self.ema.copy_(batch)
        else:
            self.ema.mul_(self.momentum).add_(batch, alpha=1.0 - self.momentum)

    def _absmax(self):
        return self.ema.clone()

    def _sync(self, world):
        has = (self.num_batches > 0).to(self.ema.dtype)
        total = self.ema * has
        count = has.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        if float(count) > 0:
            self.ema.copy_(total / count)

    def _reset(self):
        self.ema.zero_()

    def extra_repr(self):
        return f"{super().extra_repr()}, momentum={self.momentum}"


def _pow2_ceil(m: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= m, elementwise (0 stays 0)."""
    mant, exp = torch.frexp(m)  # m = mant * 2**exp, mant in [0.5, 1)
    exp = torch.where(mant == 0.5, exp - 1, exp)
    return torch.where(m > 0, torch.ldexp(torch.ones_like(m), exp), torch.zeros_like(m))


def _log2_pow2(p: torch.Tensor) -> torch.Tensor:
    """log2 of exact powers of two (int64); 0 for p == 0."""
    return torch.where(p > 0, torch.frexp(p)[1].long() - 1, torch.zeros_like(p, dtype=torch.long))


class PercentileObserver(Observer):
    """The alpha-quantile of |x| per statistic, streamed through a histogram (activations are never kept).

    Each statistic has ``bins`` bins over [0, hist_max], hist_max a power of two: when a batch exceeds it, hist_max
    doubles (k times) and bins merge 2**k at a time, an exact re-binning. Because every range is a power of two the
    bin edges do not depend on batch order, and ranks re-bin onto a common range exactly under DDP.
    ``absmax()`` = the quantile, interpolated linearly inside its bin, never above the exact running max (so
    alpha=1.0 gives the max). Error vs the exact quantile of all data seen: about one bin width (hist_max / bins).

    DDP: MAX of hist_max and of the running max, re-bin, then the mean of the histograms (SUM / world: the same
    quantile as the summed histogram, and idempotent).
    """

    def __init__(self, granularity: Granularity | dict = PerTensor(), channels: int = 1, name: str = "",
                 alpha: float = 0.9999, bins: int = 2048):
        super().__init__(granularity, channels, name)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"PercentileObserver: alpha must be in (0, 1], got {alpha}")
        if bins < 2:
            raise ValueError(f"PercentileObserver: bins must be >= 2, got {bins}")
        self.alpha, self.bins = float(alpha), int(bins)
        self.register_buffer("hist", torch.zeros(*self.stat_shape, self.bins, dtype=torch.float64))
        self.register_buffer("hist_max", torch.zeros(self.stat_shape))
        self.register_buffer("max_abs", torch.zeros(self.stat_shape))

    def _rebin_(self, new_max: torch.Tensor) -> None:
        """Move every histogram onto the range ``new_max`` (powers of two, >= hist_max): bin i -> i >> k."""
        k = (_log2_pow2(new_max) - _log2_pow2(self.hist_max)).clamp_(0, 62)  # 2**62 > any bins: all -> bin 0
        k = torch.where(self.hist_max > 0, k, torch.zeros_like(k))  # an empty range holds only zeros, in bin 0
        if bool((k > 0).any()):
            idx = torch.arange(self.bins, device=self.hist.device) >> k.unsqueeze(-1)  # (*stat, bins)
            self.hist.copy_(torch.zeros_like(self.hist).scatter_add_(-1, idx, self.hist))
        self.hist_max.copy_(torch.maximum(self.hist_max, new_max))

    def _update(self, x):
        a = self.granularity.stat_view(x).abs()  # (*stat, n)
        batch_max = a.amax(-1)
        self.max_abs.copy_(torch.maximum(self.max_abs, batch_max))
        self._rebin_(_pow2_ceil(torch.maximum(self.hist_max, batch_max)))
        # In place on |x| to keep the transient memory at ~8 bytes per element. hist_max is a power of two, so
        # a / hist_max is exact; a zero range (every value so far is 0) maps everything to bin 0.
        hm = self.hist_max.unsqueeze(-1)
        a.div_(torch.where(hm > 0, hm, torch.ones_like(hm))).mul_(self.bins).floor_().clamp_(0, self.bins - 1)
        n_stats = max(self.hist[..., 0].numel(), 1)
        flat = a.reshape(n_stats, -1).to(torch.int32)  # (stats, n) bin index
        if n_stats > 1:
            flat += torch.arange(n_stats, device=flat.device, dtype=torch.int32).unsqueeze(-1) * self.bins
        counts = torch.bincount(flat.reshape(-1), minlength=n_stats * self.bins)
        self.hist.add_(counts.reshape(self.hist.shape).to(self.hist.dtype))

    def _absmax(self):
        cum = self.hist.cumsum(-1)  # (*stat, bins)
        total = cum[..., -1:]
        target = self.alpha * total
        b = torch.searchsorted(cum, target).clamp_(max=self.bins - 1)  # first bin with cum >= target
        prev = torch.where(b > 0, cum.gather(-1, (b - 1).clamp_min(0)), torch.zeros_like(target))
        in_bin = self.hist.gather(-1, b)
        frac = torch.where(in_bin > 0, (target - prev) / torch.where(in_bin > 0, in_bin, 1.0), 1.0).clamp_(0, 1)
        width = self.hist_max.double().unsqueeze(-1) / self.bins
        q = ((b.double() + frac) * width).squeeze(-1)
        return torch.minimum(q.float(), self.max_abs)

    def _sync(self, world):
        new_max = self.hist_max.clone()
        dist.all_reduce(new_max, op=dist.ReduceOp.MAX)
        dist.all_reduce(self.max_abs, op=dist.ReduceOp.MAX)
        self._rebin_(new_max)
        dist.all_reduce(self.hist, op=dist.ReduceOp.SUM)
        self.hist.div_(world)

    def _reset(self):
        self.hist.zero_()
        self.hist_max.zero_()
        self.max_abs.zero_()

    def extra_repr(self):
        return f"{super().extra_repr()}, alpha={self.alpha}, bins={self.bins}"


OBSERVERS: dict[str, type[Observer]] = {"minmax": MinMaxObserver, "percentile": PercentileObserver,
                                        "ema": EMAObserver}


def make_observer(kind: str, granularity: Granularity | dict = PerTensor(), channels: int = 1, name: str = "",
                  **kwargs: Any) -> Observer:
    """Build an observer by name: "minmax", "percentile" (alpha=, bins=) or "ema" (momentum=)."""
    cls = OBSERVERS.get(kind)
    if cls is None:
        raise ValueError(f"unknown observer kind {kind!r}; choose one of {sorted(OBSERVERS)}")
    return cls(granularity, channels, name, **kwargs)


class DualScaleObserver(Observer):
    """The observer of a dual-scale point (``QuantSpec.dual_scale``, ``qmamba.quant.dual_scale``): three
    sub-observers fed the same tensor, whose buffers travel in the state_dict under ``baseline.`` / ``threshold.`` /
    ``outlier.``:

    - ``baseline``: the spec's own observer (kind / alpha as without dual_scale): ``absmax()`` / ``scale()``, and
      both scales of the control group (equal_scales);
    - ``threshold``: a PercentileObserver at ``threshold_alpha``: T;
    - ``outlier``: a MinMaxObserver (outlier "absmax") or a PercentileObserver at ``outlier_alpha``: A.

    ``dual_scales(bits)`` -> (s_in, s_out), stat_shape fp32 > 0:
      equal_scales:  s_in = s_out = scale_from_absmax(baseline.absmax(), bits)   (bit-identical to the baseline)
      mask:          s_in = scale_from_absmax(T, bits) = T / 127,  s_out = scale_from_absmax(max(A, T), bits)
      piecewise:     s_in = max(T, eps) / knee,  s_out = max(A - T, eps) / (127 - knee)
    """

    def __init__(self, granularity: Granularity | dict = PerTensor(), channels: int = 1, name: str = "",
                 baseline_kind: str = "minmax", baseline_kwargs: dict | None = None, dual_scale=None):
        super().__init__(granularity, channels, name)
        if dual_scale is None:
            raise ValueError(f"DualScaleObserver {self._label()}: needs the point's DualScaleSpec")
        self.dual = dual_scale
        self.baseline = make_observer(baseline_kind, granularity, channels, name, **(baseline_kwargs or {}))
        self.threshold = PercentileObserver(granularity, channels, name, alpha=dual_scale.threshold_alpha)
        self.outlier = (MinMaxObserver(granularity, channels, name) if dual_scale.outlier == "absmax" else
                        PercentileObserver(granularity, channels, name, alpha=dual_scale.outlier_alpha))

    def _subs(self):
        return (self.baseline, self.threshold, self.outlier)

    def _update(self, x):
        for obs in self._subs():
            obs._update(x)
            obs.num_batches += 1

    def _absmax(self):
        return self.baseline.absmax()

    def _sync(self, world):
        for obs in self._subs():
            obs.sync_()

    def _reset(self):
        for obs in self._subs():
            obs.reset_()

    def dual_scales(self, bits: int = 8, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_in, s_out) as in the class docstring, checked finite and > 0."""
        self._require_data()
        label = f"observer {self._label()}"
        if self.dual.equal_scales:
            s = self.scale(bits)
            return s, s.clone()
        T, A = self.threshold.absmax().float(), self.outlier.absmax().float()
        if self.dual.encoding == "mask":
            s_in, s_out = scale_from_absmax(T, bits, eps), scale_from_absmax(torch.maximum(A, T), bits, eps)
        else:
            k = self.dual.knee
            s_in = T.clamp_min(eps) / k
            s_out = (A - T).clamp_min(eps) / (127 - k)
        return check_scale(s_in, f"{label} (inlier)"), check_scale(s_out, f"{label} (outlier)")

    def extra_repr(self):
        return f"{super().extra_repr()}, dual_scale={self.dual}"
