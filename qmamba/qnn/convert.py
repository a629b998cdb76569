"""Model-level transforms: ``prepare`` (module swap to quantizable twins per a recipe), ``calibrate`` (observe, then
freeze scales), ``set_mode`` (fp / fakequant / int8 for the whole model), ``convert`` (store int8 weights), and the
fakequant-vs-int8 ``agreement_report``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from qmamba.modes import parse_mode
from qmamba.qnn.modules import TWINS, QuantTwin
from qmamba.qnn.point import QuantPoint
from qmamba.quant.dual_scale import pack_mask
from qmamba.quant.recipe import Recipe, load_recipe


def twins(model: nn.Module) -> Iterator[QuantTwin]:
    return (m for m in model.modules() if isinstance(m, QuantTwin))


def quant_points(model: nn.Module) -> Iterator[QuantPoint]:
    return (m for m in model.modules() if isinstance(m, QuantPoint))


def is_prepared(model: nn.Module) -> bool:
    return next(twins(model), None) is not None


def _plan(model: nn.Module, recipe: Recipe) -> Iterator[tuple[str, nn.Module, type, dict]]:
    """(module name, module, twin class, point -> spec or None) for every float part ``recipe`` quantizes."""
    for name, module in model.named_modules():
        twin_cls = TWINS.get(type(module))
        if twin_cls is None:
            continue
        specs = {point: recipe.spec_for(f"{name}.{point}") for point in twin_cls.POINTS}
        if any(spec is not None for spec in specs.values()):
            yield name, module, twin_cls, specs


def planned_activation_points(model: nn.Module, recipe: Recipe | str | dict) -> list[str]:
    """The names of the activation points ``prepare(model, recipe)`` would create on an fp model, without
    preparing it."""
    recipe = load_recipe(recipe)
    return [f"{name}.{point}" for name, _, twin_cls, specs in _plan(model, recipe)
            for point, spec in specs.items() if spec is not None and not twin_cls.POINTS[point][0]]


def prepare(model: nn.Module, recipe: Recipe | str | dict) -> nn.Module:
    """Swap every part a recipe quantizes for its twin, in place; parameters are shared, not copied. Calling it on
    an already prepared model changes nothing. The recipe is kept on the model (``model.quant_recipe``)."""
    recipe = load_recipe(recipe)
    if is_prepared(model):
        current = getattr(model, "quant_recipe", None)
        if current is not None and current.to_dict() != recipe.to_dict():
            raise ValueError(f"this model is already prepared with recipe {current.name!r}; preparing it again with "
                             f"{recipe.name!r} would mix the two — start from the fp model")
        return model
    swaps = [(name, twin_cls.from_float(module, name, specs)) for name, module, twin_cls, specs in _plan(model, recipe)]
    if not swaps:
        raise ValueError(f"recipe {recipe.name!r} matches no quantization point of this model; check its targets "
                         "(e.g. '*.mixer.in_proj.input')")
    device = next(model.parameters()).device  # new points (observers, scales) live where the model does
    for name, twin in swaps:
        twin.quant_points.to(device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, twin)
    model.quant_recipe = recipe
    return model


def set_mode(model: nn.Module, mode: str | int) -> nn.Module:
    """Put every twin in ``mode``: "int8" | "fp" | "fakequant" (or 0 / 1 / 2)."""
    mode = parse_mode(mode)
    found = False
    for twin in twins(model):
        twin.qmode = mode
        found = True
    if not found and mode != "fp":
        raise ValueError(f"mode {mode!r} needs a prepared model (qmamba.qnn.prepare with a recipe); this one is fp")
    return model


def current_mode(model: nn.Module) -> str:
    modes = {t.qmode for t in twins(model)}
    return modes.pop() if len(modes) == 1 else ("fp" if not modes else "mixed")


@contextlib.contextmanager
def observing(model: nn.Module):
    """Observers of every activation point watch the inputs inside this block."""
    points = [p for p in quant_points(model) if not p.is_weight]
    for p in points:
        p.observing = True
    try:
        yield points
    finally:
        for p in points:
            p.observing = False


def freeze_scales_(model: nn.Module) -> None:
    """Reduce observer statistics across ranks (DDP), then set every activation scale from them."""
    for point in quant_points(model):
        if not point.is_weight:
            point.observer.sync_()
            point.freeze_()


def is_calibrated(model: nn.Module) -> bool:
    points = [p for p in quant_points(model) if not p.is_weight]
    return bool(points) and all(p.is_ready() for p in points)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, max_batches: int | None = None, progress: bool = True) -> int:
    """Run ``batches`` ((x, ...) tuples or tensors of token ids) through the fp model with observers on, then
    freeze the scales. Returns the number of batches seen."""
    if not is_prepared(model):
        raise ValueError("calibrate needs a prepared model: call qmamba.qnn.prepare(model, recipe) first")
    device = next(model.parameters()).device
    was_training, mode = model.training, current_mode(model)
    model.eval()
    set_mode(model, "fp")
    seen = 0
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="calibrating", total=max_batches, leave=False)
    try:
        with observing(model) as points:
            for p in points:  # a new calibration starts from nothing
                p.observer.reset_()
            for batch in iterator:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x.to(device))
                seen += 1
                if max_batches is not None and seen >= max_batches:
                    break
        if seen == 0:
            raise ValueError("the calibration set is empty: give at least one batch (check calibration_samples / "
                             "the calibration dataloader)")
        freeze_scales_(model)
    finally:
        set_mode(model, mode if mode != "mixed" else "fp")
        model.train(was_training)
    return seen


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """Store every quantized weight as int8 codes (same parameter name, dtype int8) with its frozen scale, and put
    the model in int8 mode. The result only runs in int8 mode."""
    if not is_calibrated(model):
        raise ValueError("convert needs a calibrated model: run qmamba.qnn.calibrate (or the calibration callback)")
    for twin in twins(model):
        qw = twin.q("weight") if "weight" in twin.POINTS else None
        if qw is None or twin.weight.dtype == torch.int8:
            continue
        weight = twin.weight_to_quantize()  # the weight in the frame of the quantized input (rotated or not)
        qw.store_weight_scale_(weight)
        codes, _ = qw.quantize(weight)
        twin.weight = nn.Parameter(codes, requires_grad=False)
    return set_mode(model, "int8")


def is_converted(model: nn.Module) -> bool:
    return any(getattr(t, "weight", None) is not None and t.weight.dtype == torch.int8 for t in twins(model))


@dataclass
class Agreement:
    point: str
    elements: int
    identical: float  # share of identical int8 codes (dual-scale mask encoding: identical codes and outlier flags)
    max_lsb: int  # largest code difference (dual-scale mask: among elements whose flags agree)
    flag_flips: int = 0  # dual-scale mask encoding: elements whose outlier flag differs (counted as not identical)

    @property
    def meets_contract(self) -> bool:
        return self.identical >= 0.999 and self.max_lsb <= 1


@torch.no_grad()
def agreement_report(model: nn.Module, input_ids: torch.Tensor, forcing: str = "op") -> list[Agreement]:
    """For every quantized activation: fakequant vs int8 codes (DESIGN §3 contract: >= 99.9 % identical and never
    more than 1 LSB apart).

    The model runs once in int8, recording every point's codes, then every residual block runs again in fakequant
    on the inputs (residual stream included) it received in that int8 run. With
    - ``forcing="op"`` (the contract's measure), every point inside the block also records its own fakequant codes
      but hands the int8 run's codes on, so each op computes on exactly the int8 inputs its int8 twin had, and a
      point's row measures the one op that produced its tensor;
    - ``forcing="block"``, differences inside a block propagate through it (the scan carries them along the
      sequence): drift, not op numerics.
    Differences carried across blocks show in the perplexities of the two modes."""
    from qmamba.models.lm import Block

    if forcing not in ("op", "block"):
        raise ValueError(f"forcing must be 'op' or 'block', got {forcing!r}")
    points = [p for p in quant_points(model) if not p.is_weight]
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    mode = current_mode(model)
    block_inputs: dict[int, tuple] = {}
    hooks = [b.register_forward_pre_hook(lambda mod, args, i=i: block_inputs.__setitem__(i, args))
             for i, b in enumerate(blocks)]
    codes: dict[str, dict[str, torch.Tensor]] = {"int8": {}, "fakequant": {}}
    flags: dict[str, dict[str, torch.Tensor | None]] = {"int8": {}, "fakequant": {}}  # dual-scale mask encoding
    try:
        for p in points:
            p.recording = True
        set_mode(model, "int8")
        model(input_ids)
        codes["int8"] = {p.name: p.recorded for p in points}
        flags["int8"] = {p.name: p.recorded_mask for p in points}
        for p in points:
            p.recorded, p.recorded_mask = None, None
            if forcing == "op":
                p.forced = codes["int8"][p.name]
                if flags["int8"][p.name] is not None:
                    p.forced_mask = pack_mask(flags["int8"][p.name])
        for h in hooks:
            h.remove()
        hooks = []
        set_mode(model, "fakequant")
        if blocks:
            for i, block in enumerate(blocks):
                block(*block_inputs[i])
        else:
            model(input_ids)
        codes["fakequant"] = {p.name: p.recorded for p in points}
        flags["fakequant"] = {p.name: p.recorded_mask for p in points}
    finally:
        for h in hooks:
            h.remove()
        for p in points:
            p.recording, p.recorded, p.forced = False, None, None
            p.recorded_mask, p.forced_mask = None, None
        set_mode(model, mode if mode != "mixed" else "fp")
    rows = []
    for p in points:
        a, b = codes["fakequant"][p.name], codes["int8"][p.name]
        if a is None or b is None:
            continue
        diff = (a.to(torch.int16) - b.to(torch.int16)).abs()
        fa, fb = flags["fakequant"][p.name], flags["int8"][p.name]
        if fa is None and fb is None:
            rows.append(Agreement(p.name, diff.numel(), float((diff == 0).double().mean()), int(diff.max())))
            continue
        # dual-scale mask encoding: a code means something only with its flag; a flipped flag is a different value
        flip = fa != fb if fa is not None and fb is not None else torch.ones_like(diff, dtype=torch.bool)
        same = (diff == 0) & ~flip
        max_lsb = int(diff[~flip].max()) if bool((~flip).any()) else 0
        rows.append(Agreement(p.name, diff.numel(), float(same.double().mean()), max_lsb, int(flip.sum())))
    return rows


def format_agreement(rows: list[Agreement]) -> str:
    lines = [f"{'quantization point':60s} {'elements':>10s} {'identical':>10s} {'max LSB':>8s}"]
    for r in rows:
        flag = "" if r.meets_contract else "  <-- breaks the contract"
        if r.flag_flips:
            flag += f"  ({r.flag_flips} outlier flags differ)"
        lines.append(f"{r.point:60s} {r.elements:10d} {100 * r.identical:9.3f}% {r.max_lsb:8d}{flag}")
    return "\n".join(lines)


def int8_layout_(model: nn.Module) -> nn.Module:
    """Give a prepared model the parameter layout of a converted one (int8 weights, zero codes) so an int8
    checkpoint's state dict loads into it; the codes and scales come from the checkpoint."""
    for twin in twins(model):
        qw = twin.q("weight") if "weight" in twin.POINTS else None
        if qw is not None and twin.weight.dtype != torch.int8:
            twin.weight = nn.Parameter(torch.zeros_like(twin.weight, dtype=torch.int8), requires_grad=False)
    return set_mode(model, "int8")
