"""The dual-scale experiment of issue 5 on one fp checkpoint: baseline / control / treatment (mask) / treatment
(piecewise) recipes of the SSM input (``scan.u`` of Mamba1, ``scan.x`` of Mamba2), after PTQ and after QAT, over
several seeds, with the outlier share per layer.

    python benchmarks/dual_scale_experiment.py --checkpoint runs/pretrain_gpu/checkpoints/best.ckpt \\
        --family mamba1 --seeds 0,1,2 --qat-seeds 0,1 --qat-steps 20 --out runs/dual_scale/mamba1
    python benchmarks/dual_scale_experiment.py --checkpoint runs/pretrain_gpu_mamba2/checkpoints/best.ckpt \\
        --family mamba2 --seeds 0,1,2 --qat-seeds 0,1 --qat-steps 20 --out runs/dual_scale/mamba2

Groups (``--groups``, recipe files ``configs/recipes/dual_scale_<group>_<family>.yaml``):
  baseline             the house preset written out (one scale on the SSM input);
  control              the SSM input on the dual-scale code path (mask) with both scales = the baseline's: must
                       reproduce the baseline bit for bit;
  treatment            dual-scale, mask encoding (inlier scale from the 99.9th percentile, outlier scale from absmax);
  treatment_piecewise  the same thresholds, piecewise encoding (knee 112).

What runs, in order (every score is ``qmamba.sensitivity.perplexity_and_bpb``, fp32, on the test split of the
checkpoint's own datamodule, ``qmamba.evaluation.scoring_batches``; ``--limit-batches`` takes its first N batches):
  1. fp: the fp model once (the reference of the "Δ vs fp" column).
  2. PTQ, per calibration seed s (``--seeds``) and group: a fresh copy of the fp model, ``prepare`` with the group's
     recipe, ``calibrate`` on the datamodule's calibration set drawn with ``calibration_seed = s`` (its samples /
     seq_len / batch size as saved with the checkpoint), then score in int8 and in fakequant mode. At the first seed,
     the outlier share per layer of the SSM input (``qmamba.outlier_share.outlier_shares``, fp mode, the scored
     batches). The calibration batches of a seed are drawn once and shared by the groups, so the groups of one seed
     see the same calibration data (paired comparison).
  3. QAT, per QAT seed s (``--qat-seeds``) and group (``--qat-groups``): ``train.py``'s own machinery in this process
     (``TrainCLI`` + ``fit_and_test``) on ``--qat-config`` (default configs/qat_gpu.yaml / qat_gpu_mamba2.yaml) with
     these overrides: seed_everything = s, data calibration_seed = s, init_from = --checkpoint, max_steps =
     --qat-steps, the callbacks Calibration (recipe = the group's) -> QAT -> Finalize only (ModelCheckpoint and
     ModeValidation dropped: no validation, Finalize converts the last weights), no logger, no progress bar. The
     finalized int8 checkpoint is loaded and scored in int8 mode on the same test batches as PTQ. The config of each
     run is written beside its checkpoint (``DIR/qat/<group>_seed<s>/qat_config.yaml``). QAT calibrates on the QAT
     config's calibration set (configs/qat_gpu*.yaml: 64 x 512 bytes), PTQ on the checkpoint's (the house
     pretraining configs leave train.py's default, 128 x 512).
     ``--qat-repeats N`` (default 1) does each (group, seed) run N times with identical settings, repeat 0 of every
     run first, in ``DIR/qat/<group>_seed<s>_r<k>`` (k = 0 .. N-1; the folder keeps its plain name when N is 1): the
     spread of the reruns is the run-to-run noise of QAT itself (non-deterministic GPU kernels, atomics), against
     which |control - baseline| is judged. ``--qat-deterministic`` adds ``trainer.deterministic: true`` (Lightning:
     ``torch.use_deterministic_algorithms``, cudnn.benchmark off) and ``model.init_args.backend: torch`` (the
     pure-torch reference ops, the teacher's too) to every QAT run; it also sets CUBLAS_WORKSPACE_CONFIG=:4096:8
     before any GPU work (unless already set), which deterministic cuBLAS needs. With it, the reruns and the control
     vs the baseline should be bit for bit on a GPU too, at the speed of the reference ops; the QAT config's
     precision is kept. Scoring still uses ``--backend``.

``--backend`` is the op backend of every scored model: ``torch`` (default) is the reference int8 backend, as the
issue-3 house results in benchmarks/RESULTS.md; ``auto`` runs the GPU kernels (the int8 scans read the dual-scale
encoding: the CUDA Mamba1 scan, the Triton Mamba2 SSD). Either way every group runs the same scan on its codes, and
the PTQ control reproduces the baseline bit for bit (checked on CPU by tests/test_dual_scale_experiment.py). QAT
training runs on the QAT config's backend (LMModule's, default auto), in its precision (bf16-mixed on the GPU); its
control tracks the baseline too: the dual-scale STE passes the gradient where the single-scale one does (on the
GPU up to the run-to-run noise of the kernels; ``--qat-repeats`` measures it, ``--qat-deterministic`` removes it).

Cost: 1 + 2 x groups x seeds passes over the test split (fp, then int8 and fakequant per PTQ model), groups x seeds
calibrations, and qat-groups x qat-seeds x qat-repeats QAT runs of --qat-steps steps each (plus, per run, two model
loads, one calibration, finalize and one int8 pass). ``--limit-batches``, ``--qat-groups`` and ``--qat-repeats`` are
the knobs for a time budget; ``--skip-qat`` / ``--skip-ptq`` split the phases (give each its own ``--out``: the files
of a folder are rewritten). ``--qat-deterministic`` trains on the torch reference ops: slower QAT steps on a GPU.

Outputs in ``--out`` (rewritten after every row, so a run stopped early keeps what it measured):
  rows.csv            family, phase (fp / ptq / qat), group, encoding, seed, repeat (QAT: 0 .. --qat-repeats - 1;
                      fp / PTQ: 0), mode, ppl, bpb, seconds (scoring), setup_seconds (prepare + calibrate for PTQ;
                      fit + finalize + load for QAT), recipe
  outlier_shares.csv  family, group, encoding, seed, layer, point, share (fraction in [0, 1])
  summary.md          per phase / mode / group: mean ± std over seeds of ppl and bpb (std: sample std, n - 1), the
                      change against the baseline in % (paired by seed: mean ± std of group_s / baseline_s - 1) and
                      against fp; the noise (the baseline's seed-to-seed spread, |control - baseline| per seed); the
                      outlier share per layer. The header says the QAT repeats and whether QAT was deterministic.
                      The tables and paired deltas read repeat 0 only (so they are those of --qat-repeats 1); with
                      more repeats, a "same-seed rerun noise" paragraph after the QAT table: per group the max
                      |ppl(repeat k) - ppl(repeat 0)| over seeds and k, absolute and in %, and whether
                      |control - baseline| (repeat 0) of each seed is within the baseline's rerun spread of that
                      seed. Also printed to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import gc
import inspect
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `callbacks` (class paths in the QAT config) and qmamba from a checkout

from qmamba.data import TextDataModule  # noqa: E402
from qmamba.evaluation import data_config_of, scoring_batches  # noqa: E402
from qmamba.lightning.checkpoint import load_checkpoint_model  # noqa: E402
from qmamba.models import set_backend  # noqa: E402
from qmamba.outlier_share import outlier_shares  # noqa: E402
from qmamba.qnn import calibrate, is_prepared, prepare, set_mode  # noqa: E402
from qmamba.quant.recipe import Recipe, load_recipe  # noqa: E402
from qmamba.sensitivity import layer_of, perplexity_and_bpb  # noqa: E402

RECIPES = ROOT / "configs" / "recipes"
GROUPS = ("baseline", "control", "treatment", "treatment_piecewise")


@dataclass(frozen=True)
class Family:
    layer: str  # MambaConfig.layer
    point: str  # the SSM input's point name inside a mixer
    qat_config: str
    pretrain_config: str


FAMILIES = {
    "mamba1": Family("Mamba1", "scan.u", "configs/qat_gpu.yaml", "configs/pretrain_gpu.yaml"),
    "mamba2": Family("Mamba2", "scan.x", "configs/qat_gpu_mamba2.yaml", "configs/pretrain_gpu_mamba2.yaml"),
}
PTQ_MODES = ("int8", "fakequant")
# the QAT callbacks the experiment keeps from the QAT config, in the config's order (train.py's pipeline minus the
# validation-only ones); both spellings of their class paths
KEEP_CALLBACKS = {f"callbacks.{n}": n for n in ("Calibration", "QAT", "Finalize")} | \
                 {f"callbacks.quantization.{n}": n for n in ("Calibration", "QAT", "Finalize")}
# datamodule settings that decide which text is train / test: the QAT run must use the checkpoint's
DATA_IDENTITY = ("corpus", "tokenizer", "val_fraction", "test_fraction", "split_seed")


@dataclass
class Row:
    family: str
    phase: str  # fp | ptq | qat
    group: str
    encoding: str  # single | mask | piecewise ("" for fp)
    seed: int | None
    repeat: int  # QAT: which of the --qat-repeats identical runs of (group, seed), 0 first; fp / PTQ: 0
    mode: str
    ppl: float
    bpb: float
    seconds: float  # scoring
    setup_seconds: float  # prepare + calibrate (PTQ), fit + finalize + load (QAT)
    recipe: str


@dataclass
class Share:
    family: str
    group: str
    encoding: str
    seed: int
    layer: int | None
    point: str
    share: float


# ---- arguments -----------------------------------------------------------------------------------------------------
def parse_seeds(text: str, flag: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be a comma list of integers such as 0,1,2, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"{flag} must list distinct integers >= 0 (e.g. 0,1,2), got {text!r}")
    return seeds


def parse_groups(text: str, flag: str) -> list[str]:
    groups = [g.strip() for g in text.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise ValueError(f"{flag}: unknown group(s) {unknown or text!r}; choose from {', '.join(GROUPS)}")
    if len(set(groups)) != len(groups):
        raise ValueError(f"{flag} lists a group twice: {text!r}")
    return [g for g in GROUPS if g in groups]  # the baseline first: deltas are against it


def recipe_path(family: str, group: str) -> Path:
    path = RECIPES / f"dual_scale_{group}_{family}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"recipe file {path} is missing: the {group} group of {family} needs it "
                                "(configs/recipes/dual_scale_<group>_<family>.yaml)")
    return path


def encoding_of(recipe: Recipe, family: str) -> str:
    """'single' (one scale on the SSM input), or the dual-scale encoding of the family's SSM input point."""
    spec = recipe.spec_for(f"backbone.layers.0.mixer.{FAMILIES[family].point}")
    if spec is None:
        raise ValueError(f"recipe {recipe.name!r} does not quantize the {family} SSM input "
                         f"*.mixer.{FAMILIES[family].point}: the experiment compares recipes of that point")
    return "single" if spec.dual_scale is None else spec.dual_scale.encoding


def check_checkpoint(path: str, family: str) -> None:
    fam = FAMILIES[family]
    if not Path(path).exists():
        raise FileNotFoundError(f"--checkpoint {path} does not exist: train the fp {family} model first "
                                f"(`python train.py --config {fam.pretrain_config}`) or point --checkpoint at it")
    if not str(path).endswith(".ckpt"):
        raise ValueError(f"--checkpoint {path}: give a qmamba .ckpt (it carries the datamodule settings the test "
                         "split and calibration set come from), e.g. runs/pretrain_gpu/checkpoints/best.ckpt")
    if not data_config_of(path):
        raise ValueError(f"--checkpoint {path} holds no datamodule settings (datamodule_hyper_parameters): give a "
                         "checkpoint written by train.py")


# ---- data ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _hparams(dm: TextDataModule, **values):
    """Temporarily set datamodule hyperparameters (the calibration seed), restored afterwards."""
    old = {k: dm.hparams[k] for k in values}
    try:
        dm.hparams.update(values)
        yield dm
    finally:
        dm.hparams.update(old)


def calibration_batches(dm: TextDataModule, seed: int, device) -> list:
    """The datamodule's calibration set drawn with ``calibration_seed = seed`` (its samples, seq_len and batch size
    otherwise), as a list on ``device``. Loaded in this process (num_workers 0): the same windows either way."""
    with _hparams(dm, calibration_seed=seed, num_workers=0):
        return [tuple(t.to(device) for t in b) for b in dm.calibration_dataloader()]


def _free() -> None:
    """Return freed memory (call after ``del`` of the last reference to a model)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def score(model, batches, device) -> tuple[dict[str, float], float]:
    _sync(device)
    start = time.perf_counter()
    r = perplexity_and_bpb(model, batches, device)
    _sync(device)
    return r, time.perf_counter() - start


# ---- QAT through train.py's CLI --------------------------------------------------------------------------------------
def _data_defaults() -> dict:
    return {k: p.default for k, p in inspect.signature(TextDataModule.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def check_qat_data(qat_cfg: dict, qat_path: str, checkpoint: str) -> None:
    """The QAT config must train on the checkpoint's corpus and split (else it could train on the test text)."""
    defaults = _data_defaults()
    ours = {**defaults, **((qat_cfg.get("data") or {}).get("init_args") or {})}
    theirs = {**defaults, **data_config_of(checkpoint)}
    diff = {k: (ours[k], theirs[k]) for k in DATA_IDENTITY if ours[k] != theirs[k]}
    if diff:
        detail = ", ".join(f"{k}: {a!r} in the QAT config vs {b!r} in the checkpoint" for k, (a, b) in diff.items())
        raise ValueError(f"--qat-config {qat_path} splits other data than --checkpoint {checkpoint} ({detail}): "
                         "give a QAT config whose data.init_args match the checkpoint's")


def qat_run_config(base: dict, qat_path: str, checkpoint: str, recipe: Path, seed: int, steps: int,
                   run_dir: Path, deterministic: bool = False) -> dict:
    """The QAT config with the experiment's overrides (see the module docstring). ``deterministic``
    (``--qat-deterministic``): also ``trainer.deterministic: true`` and ``model.init_args.backend: torch`` (the
    pure-torch reference ops, which have deterministic implementations on a GPU where the fused kernels need not);
    without it, the QAT config's trainer and backend are left as they are."""
    cfg = copy.deepcopy(base)
    trainer = cfg.setdefault("trainer", {})
    kept, names = [], []
    for cb in trainer.get("callbacks") or []:
        name = KEEP_CALLBACKS.get(cb.get("class_path", "") if isinstance(cb, dict) else "")
        if name is None:
            continue
        cb = copy.deepcopy(cb)
        args = cb.setdefault("init_args", {}) or {}
        cb["init_args"] = args
        if name == "Calibration":
            args["recipe"] = str(recipe)
        elif name == "Finalize":
            cb["init_args"] = {"path": str(run_dir / "int8.ckpt")}
        kept.append(cb)
        names.append(name)
    missing = [n for n in ("Calibration", "QAT", "Finalize") if n not in names]
    if missing:
        raise ValueError(f"--qat-config {qat_path} has no {', '.join('callbacks.' + n for n in missing)} in "
                         "trainer.callbacks: give a QAT config such as configs/qat_gpu.yaml")
    trainer.update(callbacks=kept, max_steps=steps, logger=False, enable_progress_bar=False,
                   enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                   num_sanity_val_steps=0, default_root_dir=str(run_dir))
    trainer.pop("max_time", None)
    cfg["seed_everything"] = seed
    model = cfg.get("model") or {}
    if "init_args" not in model:
        raise ValueError(f"--qat-config {qat_path} has no model.init_args: give a QAT config such as "
                         "configs/qat_gpu.yaml")
    model["init_args"]["init_from"] = str(checkpoint)
    if deterministic:
        trainer["deterministic"] = True
        trainer.pop("benchmark", None)  # cudnn.benchmark would pick kernels by timing: Lightning turns it off
        model["init_args"]["backend"] = "torch"  # the QAT callback's teacher follows the module's backend
    data = cfg.setdefault("data", {"class_path": "qmamba.data.TextDataModule"})
    data.setdefault("init_args", {})["calibration_seed"] = seed
    cfg["test"] = False
    cfg.pop("ckpt_path", None)
    return cfg


def run_qat(cfg: dict, run_dir: Path) -> Path:
    """``python train.py --config <cfg>`` in this process; returns the int8 checkpoint Finalize wrote. The process
    state a run changes (the seed environment, and with ``trainer.deterministic`` torch's deterministic-algorithms
    flag, cudnn.benchmark and CUBLAS_WORKSPACE_CONFIG) is restored afterwards, so the scoring after it and the next
    run start as before it."""
    from qmamba.lightning.cli import TrainCLI

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "qat_config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = run_dir / "int8.ckpt"
    if out.exists():
        out.unlink()
    quiet = logging.getLogger("lightning.pytorch")
    level, argv = quiet.level, sys.argv
    # seed_everything sets the first two; trainer.deterministic sets the third and the torch flags
    env = {k: os.environ.get(k) for k in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG")}
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark)
    quiet.setLevel(logging.WARNING)  # "GPU available ..." banners, once per run
    sys.argv = argv[:1]  # LightningCLI warns when given args while sys.argv holds this script's own flags
    try:
        cli = TrainCLI(args=["--config", str(path)])
        cli.fit_and_test()
        del cli  # the module, its teacher, the trainer and its loaders' workers
    finally:
        quiet.setLevel(level)
        sys.argv = argv
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.backends.cudnn.benchmark = flags[2]
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    _free()
    if not out.exists():
        raise RuntimeError(f"QAT run {run_dir} finished without the Finalize checkpoint {out}")
    return out


# ---- summary -------------------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else math.nan)


def _pm(mean: float, std: float, digits: int = 4) -> str:
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def _pct(values: list[float]) -> str:
    if not values:
        return "—"
    mean, std = _mean_std([100 * v for v in values])
    return f"{mean:+.3f} %" + ("" if math.isnan(std) else f" ± {std:.3f}")


def _rerun_spread(rows: list[Row], first: dict[int, Row]) -> dict[int, tuple[float, float, bool]]:
    """Per seed of ``first`` (repeat-0 rows of one group): (max |ppl(repeat k) - ppl(repeat 0)|, the same relative
    to ppl(repeat 0), whether every rerun matched ppl and bpb bit for bit), over the reruns in ``rows`` of that group
    and seed. Seeds without a rerun are left out."""
    spread = {}
    for seed, r0 in first.items():
        again = [r for r in rows if r.group == r0.group and r.seed == seed and r.repeat > 0]
        if again:
            d = [abs(r.ppl - r0.ppl) for r in again]
            spread[seed] = (max(d), max(d) / r0.ppl, all(r.ppl == r0.ppl and r.bpb == r0.bpb for r in again))
    return spread


def summarize(rows: list[Row], shares: list[Share], meta: dict) -> str:
    """summary.md (see the module docstring) from the rows and shares of one run. ``meta``: family, checkpoint,
    batches, tokens, backend, device, seeds, qat_seeds, qat_steps, qat_config, qat_repeats (0 when QAT did not run)
    and qat_deterministic. The tables and paired deltas read repeat 0 only; the later repeats of a QAT (group, seed)
    enter the same-seed rerun noise lines alone."""
    fp = next((r for r in rows if r.phase == "fp"), None)
    qat = "; no QAT"
    if meta["qat_repeats"]:
        qat = (f"; QAT seeds {meta['qat_seeds']}, {meta['qat_steps']} steps ({meta['qat_config']}), "
               f"{meta['qat_repeats']} run(s) per group and seed, "
               + ("deterministic (trainer.deterministic, torch op backend)" if meta["qat_deterministic"] else
                  "not deterministic (the QAT config's trainer and backend)"))
    out = [f"# Dual-scale SSM input: {meta['family']} ({meta['checkpoint']})", "",
           f"Test split: {meta['batches']} batches ({meta['tokens']:,} targets), backend {meta['backend']}, "
           f"device {meta['device']}; PTQ calibration seeds {meta['seeds']}{qat}.", ""]
    if fp is not None:
        out += [f"fp: ppl {fp.ppl:.4f}, bpb {fp.bpb:.4f}", ""]
    for phase, mode in [("ptq", m) for m in PTQ_MODES] + [("qat", "int8")]:
        every = [r for r in rows if r.phase == phase and r.mode == mode]
        sel = [r for r in every if r.repeat == 0]
        if not sel:
            continue
        groups = [g for g in GROUPS if any(r.group == g for r in sel)]
        by = {g: {r.seed: r for r in sel if r.group == g} for g in groups}
        base = by.get("baseline", {})
        out += [f"## {phase.upper()}, {mode}", "",
                "| group | encoding | seeds | ppl | bpb | Δ ppl vs baseline (paired) | Δ bpb vs baseline (paired) "
                "| Δ ppl vs fp |", "|---|---|---|---|---|---|---|---|"]
        for g in groups:
            rs = list(by[g].values())
            ppl, bpb = _mean_std([r.ppl for r in rs]), _mean_std([r.bpb for r in rs])
            paired = [s for s in by[g] if s in base]
            dppl = _pct([by[g][s].ppl / base[s].ppl - 1 for s in paired]) if g != "baseline" else "—"
            dbpb = _pct([by[g][s].bpb / base[s].bpb - 1 for s in paired]) if g != "baseline" else "—"
            dfp = _pct([r.ppl / fp.ppl - 1 for r in rs]) if fp is not None else "—"
            out.append(f"| {g} | {rs[0].encoding} | {len(rs)} | {_pm(*ppl)} | {_pm(*bpb)} | {dppl} | {dbpb} | "
                       f"{dfp} |")
        out.append("")
        if base:
            bm, bs = _mean_std([r.ppl for r in base.values()])
            lo, hi = min(r.ppl for r in base.values()), max(r.ppl for r in base.values())
            noise = (f"Noise: baseline seed-to-seed ppl std {bs:.4f} ({100 * bs / bm:.3f} % of the mean), range "
                     f"{lo:.4f} … {hi:.4f} over {len(base)} seed(s)" if len(base) > 1 else
                     "Noise: one baseline seed only, no seed-to-seed spread")
            if "control" in by:
                diffs = [(s, abs(by["control"][s].ppl - base[s].ppl)) for s in by["control"] if s in base]
                noise += "; |control − baseline| ppl per seed: " + ", ".join(f"s{s} {d:.2e}" for s, d in diffs)
                exact = all(by["control"][s].ppl == base[s].ppl and by["control"][s].bpb == base[s].bpb
                            for s, _ in diffs)
                noise += " (bit for bit)" if exact and diffs else ""
            out += [noise + ".", ""]
            for g in ("treatment", "treatment_piecewise"):
                if g in by:
                    d = [by[g][s].ppl / base[s].ppl - 1 for s in by[g] if s in base]
                    if d:
                        better = sum(v < 0 for v in d)
                        out.append(f"- {g} vs baseline: ppl lower on {better}/{len(d)} seed(s), paired Δ {_pct(d)}")
            if "control" in by:
                d = [abs(by["control"][s].ppl - base[s].ppl) for s in by["control"] if s in base]
                if d:
                    within = "" if len(base) < 2 else (" (within the baseline's seed-to-seed std)" if max(d) <= bs
                                                      else " (LARGER than the baseline's seed-to-seed std)")
                    out.append(f"- control vs baseline: max |Δ ppl| {max(d):.2e}{within}")
            out.append("")
        spreads = {g: _rerun_spread(every, by[g]) for g in groups}
        if any(spreads.values()):
            out.append("Same-seed rerun noise (the same QAT run again, identical settings):")
            for g in groups:
                sp = spreads[g]
                if not sp:
                    continue
                n = sum(1 for r in every if r.group == g and r.repeat > 0 and r.seed in sp)
                worst, rel = max(v[0] for v in sp.values()), max(v[1] for v in sp.values())
                exact = " (every rerun bit for bit)" if all(v[2] for v in sp.values()) else ""
                out.append(f"- {g}: max |ppl(repeat k) − ppl(repeat 0)| {worst:.2e} ({100 * rel:.3f} %) over "
                           f"{len(sp)} seed(s), {n} rerun(s){exact}")
            sp = spreads.get("baseline", {})
            ctrl = {s: abs(by["control"][s].ppl - base[s].ppl) for s in by.get("control", {}) if s in sp}
            if ctrl:
                outside = [s for s, d in ctrl.items() if d > sp[s][0]]
                also = f" (OUTSIDE on {', '.join(f's{s}' for s in outside)})" if outside else ""
                out.append(f"- control vs baseline (repeat 0): |Δ ppl| within the baseline's same-seed rerun spread "
                           f"on {len(ctrl) - len(outside)}/{len(ctrl)} seed(s){also}: "
                           + ", ".join(f"s{s} {d:.2e} vs {sp[s][0]:.2e}" for s, d in ctrl.items()))
            out.append("")
    if shares:
        groups = [g for g in GROUPS if any(s.group == g for s in shares)]
        seed = shares[0].seed
        table: dict[tuple, dict[str, float]] = {}
        for s in shares:
            table.setdefault((s.layer, s.point.split("mixer.", 1)[-1]), {})[s.group] = s.share
        out += [f"## Outlier share of the SSM input per layer (calibration seed {seed}, %)", "",
                "Share of elements the inlier scale cannot hold: clipped by the single scale (baseline, control), "
                "stored at the outlier scale (treatments).", "",
                "| layer | point | " + " | ".join(groups) + " |", "|---|---|" + "---|" * len(groups)]
        for (layer, point), vals in table.items():
            out.append(f"| {layer} | {point} | " + " | ".join(f"{100 * vals[g]:.4f}" if g in vals else "—"
                                                            for g in groups) + " |")
        means = {g: statistics.fmean(s.share for s in shares if s.group == g) for g in groups}
        out += ["| mean | | " + " | ".join(f"{100 * means[g]:.4f}" for g in groups) + " |", ""]
    return "\n".join(out)


def write_csv(path: Path, items: list) -> None:
    if not items:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(items[0])])
        w.writeheader()
        for it in items:
            w.writerow({k: ("" if v is None else (f"{v:.6g}" if k in ("seconds", "setup_seconds") else v))
                        for k, v in asdict(it).items()})


# ---- main ----------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="the fp checkpoint (qmamba .ckpt written by train.py)")
    ap.add_argument("--family", required=True, choices=tuple(FAMILIES), help="which recipes: mamba1 or mamba2")
    ap.add_argument("--out", required=True, help="output folder (rows.csv, outlier_shares.csv, summary.md, qat/)")
    ap.add_argument("--groups", default=",".join(GROUPS), help=f"comma list of {', '.join(GROUPS)} (default all)")
    ap.add_argument("--seeds", default="0,1,2", help="PTQ calibration seeds (default 0,1,2)")
    ap.add_argument("--qat-seeds", default="0,1", help="QAT seeds: seed_everything and calibration_seed (default 0,1)")
    ap.add_argument("--qat-steps", type=int, default=20, help="QAT optimizer steps per run (default 20)")
    ap.add_argument("--qat-groups", default=None, help="groups that get QAT (default: --groups)")
    ap.add_argument("--qat-repeats", type=int, default=1,
                    help="run each (group, QAT seed) QAT N times with identical settings, to measure the same-seed "
                         "rerun noise (default 1)")
    ap.add_argument("--qat-deterministic", action="store_true",
                    help="QAT with trainer.deterministic: true and the torch op backend (reruns and control vs "
                         "baseline bit for bit on a GPU)")
    ap.add_argument("--qat-config", default=None,
                    help="QAT config to run (default configs/qat_gpu.yaml for mamba1, qat_gpu_mamba2.yaml for mamba2)")
    ap.add_argument("--skip-qat", action="store_true", help="PTQ only")
    ap.add_argument("--skip-ptq", action="store_true", help="QAT only")
    ap.add_argument("--limit-batches", type=int, default=None, help="score the first N test batches (default all)")
    ap.add_argument("--backend", default="torch", choices=("torch", "auto", "cuda"),
                    help="op backend of the scored models (default torch, see the module docstring)")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep the QAT int8 checkpoints (deleted after "
                                                                    "scoring by default)")
    args = ap.parse_args(argv)

    family = args.family
    groups = parse_groups(args.groups, "--groups")
    seeds = parse_seeds(args.seeds, "--seeds")
    qat_seeds = parse_seeds(args.qat_seeds, "--qat-seeds")
    qat_groups = parse_groups(args.qat_groups, "--qat-groups") if args.qat_groups else groups
    if args.limit_batches is not None and args.limit_batches <= 0:
        raise ValueError(f"--limit-batches must be a positive number of batches, got {args.limit_batches}")
    if not args.skip_qat and args.qat_steps <= 0:
        raise ValueError(f"--qat-steps must be >= 1 (got {args.qat_steps}); use --skip-qat for PTQ only")
    if args.qat_repeats < 1:
        raise ValueError(f"--qat-repeats must be >= 1 (1 = each QAT run once), got {args.qat_repeats}")
    if args.skip_ptq and args.skip_qat:
        raise ValueError("--skip-ptq with --skip-qat leaves nothing to run: drop one of them")
    check_checkpoint(args.checkpoint, family)
    recipes = {g: recipe_path(family, g) for g in dict.fromkeys(groups + ([] if args.skip_qat else qat_groups))}
    loaded = {g: load_recipe(str(p)) for g, p in recipes.items()}
    encodings = {g: encoding_of(r, family) for g, r in loaded.items()}
    qat_path, qat_base = None, None
    if not args.skip_qat:
        qat_path = args.qat_config or str(ROOT / FAMILIES[family].qat_config)
        if not Path(qat_path).exists():
            raise FileNotFoundError(f"--qat-config {qat_path} does not exist (the defaults live in configs/)")
        qat_base = yaml.safe_load(Path(qat_path).read_text()) or {}
        check_qat_data(qat_base, qat_path, args.checkpoint)
        qat_run_config(qat_base, qat_path, args.checkpoint, recipes[qat_groups[0]], 0, args.qat_steps,
                       Path(args.out), args.qat_deterministic)  # its errors now, not after the PTQ phase
        if args.qat_deterministic:
            # CUDA's requirement for deterministic cuBLAS (torch.use_deterministic_algorithms raises on a CUDA
            # matmul without it). Lightning's trainer.deterministic sets it too, but only when the QAT trainer is
            # built; cuBLAS sets up its workspace at its first use, the fp scoring below, so it is set before that.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    rows: list[Row] = []
    shares: list[Share] = []

    def save() -> None:
        write_csv(out / "rows.csv", rows)
        write_csv(out / "outlier_shares.csv", shares)

    dm, batches = scoring_batches(args.checkpoint, "test", args.limit_batches)
    batches = [tuple(t.to(device) for t in b) for b in batches]  # moved once, scored many times
    tokens = sum(int((b[1] != -100).sum()) for b in batches)
    base = load_checkpoint_model(args.checkpoint)
    if is_prepared(base):
        raise ValueError(f"--checkpoint {args.checkpoint} holds a quantized model (recipe "
                         f"{base.quant_recipe.name!r}); the experiment starts from the fp checkpoint, e.g. "
                         f"runs/pretrain_gpu/checkpoints/best.ckpt")
    if base.config.layer != FAMILIES[family].layer:
        other = next(f for f, v in FAMILIES.items() if v.layer == base.config.layer)
        raise ValueError(f"--checkpoint {args.checkpoint} holds a {base.config.layer} model but --family is "
                         f"{family}: use --family {other}")
    base = set_backend(base, args.backend).to(device).eval()
    meta = dict(family=family, checkpoint=args.checkpoint, batches=len(batches), tokens=tokens, backend=args.backend,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                seeds=",".join(map(str, seeds)) if not args.skip_ptq else "—",
                qat_seeds=",".join(map(str, qat_seeds)) if not args.skip_qat else "—",
                qat_steps=args.qat_steps if not args.skip_qat else 0,
                qat_repeats=args.qat_repeats if not args.skip_qat else 0,
                qat_deterministic=bool(args.qat_deterministic and not args.skip_qat),
                qat_config=Path(qat_path).name if qat_path else "no QAT")
    log(f"{family}: {args.checkpoint}, {len(batches)} test batches ({tokens:,} targets) on {meta['device']}, "
        f"backend {args.backend}")

    r, secs = score(base, batches, device)
    rows.append(Row(family, "fp", "fp", "", None, 0, "fp", r["ppl"], r["bpb"], secs, 0.0, ""))
    log(f"fp: ppl {r['ppl']:.4f} bpb {r['bpb']:.4f} ({secs:.2f} s)")
    save()

    # ---- PTQ
    if not args.skip_ptq:
        for i, seed in enumerate(seeds):
            calib = calibration_batches(dm, seed, device)
            for g in groups:
                _sync(device)
                start = time.perf_counter()
                model = prepare(copy.deepcopy(base), loaded[g])
                set_backend(model, args.backend)
                calibrate(model, calib, progress=False)
                _sync(device)
                setup = time.perf_counter() - start
                line = [f"ptq {g:19s} seed {seed}: calibrate {setup:.2f} s"]
                for mode in PTQ_MODES:
                    set_mode(model, mode)
                    r, secs = score(model, batches, device)
                    rows.append(Row(family, "ptq", g, encodings[g], seed, 0, mode, r["ppl"], r["bpb"], secs, setup,
                                    recipes[g].name))
                    line.append(f"{mode} ppl {r['ppl']:.4f} bpb {r['bpb']:.4f} ({secs:.2f} s)")
                if i == 0:
                    start = time.perf_counter()
                    for name, value in outlier_shares(model, batches, device).items():
                        shares.append(Share(family, g, encodings[g], seed, layer_of(name), name, value))
                    line.append(f"outlier shares ({time.perf_counter() - start:.1f} s)")
                log(", ".join(line))
                save()
                del model
                _free()
            del calib
            _free()

    # ---- QAT
    if not args.skip_qat:
        del base  # the QAT runs load their own copies; keep the GPU for them
        _free()
        # repeat 0 of every (seed, group) first: a run stopped early still has the paired tables complete
        runs = [(seed, g, k) for k in range(args.qat_repeats) for seed in qat_seeds for g in qat_groups]
        for seed, g, k in runs:
            name = f"{g}_seed{seed}" + (f"_r{k}" if args.qat_repeats > 1 else "")
            run_dir = out / "qat" / name
            cfg = qat_run_config(qat_base, qat_path, args.checkpoint, recipes[g], seed, args.qat_steps, run_dir,
                                 args.qat_deterministic)
            start = time.perf_counter()
            ckpt = run_qat(cfg, run_dir)
            fit = time.perf_counter() - start
            model = set_backend(load_checkpoint_model(ckpt), args.backend).to(device).eval()
            set_mode(model, "int8")
            setup = time.perf_counter() - start
            r, secs = score(model, batches, device)
            rows.append(Row(family, "qat", g, encodings[g], seed, k, "int8", r["ppl"], r["bpb"], secs, setup,
                            recipes[g].name))
            log(f"qat {name:27s}: {args.qat_steps} steps + finalize {fit:.1f} s, int8 ppl {r['ppl']:.4f} "
                f"bpb {r['bpb']:.4f} ({secs:.2f} s)")
            save()
            del model
            _free()
            if not args.keep_checkpoints:
                ckpt.unlink()

    text = summarize(rows, shares, meta)
    (out / "summary.md").write_text(text + "\n")
    print("\n" + text, flush=True)
    log(f"done: {out / 'rows.csv'}, {out / 'outlier_shares.csv'}, {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    from qmamba.lightning.cli import run_with_clear_errors

    run_with_clear_errors(main)
