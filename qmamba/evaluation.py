"""Evaluate a model on a split: token-weighted perplexity and bits per byte, timed, logged to W&B.

Used by ``evaluate.py``; the numbers come from the same ``LMModule`` test / validation loop as training, so a
checkpoint scores the same here as at the end of its training run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from qmamba.data import TextDataModule
from qmamba.lightning.module import LMModule
from qmamba.modes import MODES, parse_mode
from qmamba.ops.backend import try_import
from qmamba.qnn import is_converted, is_prepared, set_mode

SPLITS = ("test", "validation")


@dataclass
class EvalResult:
    mode: str
    split: str
    tokens: int
    perplexity: float
    bits_per_byte: float
    seconds: float

    def row(self) -> list[str]:
        return [self.mode, self.split, str(self.tokens), f"{self.perplexity:.4f}", f"{self.bits_per_byte:.4f}",
                f"{self.seconds:.1f}"]


HEADER = ["mode", "split", "tokens", "perplexity", "bits/byte", "seconds"]


def format_table(results: list[EvalResult]) -> str:
    rows = [HEADER] + [r.row() for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


def data_config_of(source: str) -> dict[str, Any]:
    """The datamodule settings saved in a qmamba checkpoint (empty for model folders / hub ids)."""
    if not str(source).endswith(".ckpt") or not Path(source).exists():
        return {}
    ckpt = torch.load(source, map_location="cpu", weights_only=False, mmap=True)  # mmap: the tensors stay unread
    saved = dict(ckpt.get("datamodule_hyper_parameters") or {})
    return {k: v for k, v in saved.items() if not k.startswith("_")}  # LightningCLI adds _class_path etc.


def scoring_batches(source: str, split: str = "validation", limit: int | None = None) -> tuple[TextDataModule, list]:
    """The datamodule saved with checkpoint ``source`` (set up) and the first ``limit`` batches (all if None) of
    ``split``: what the analysis commands (sensitivity, sweeps) score on."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    dm = TextDataModule(**data_config_of(source))
    dm.setup("fit")
    dm.setup("test")
    loader = dm.val_dataloader() if split == "validation" else dm.test_dataloader()
    batches = list(loader) if limit is None else [b for _, b in zip(range(limit), loader)]
    return dm, batches


def checkpoint_info(source: str) -> dict[str, Any]:
    """What a run comparison needs to know of a checkpoint: its kind (fp / prepared / int8), its recipe name, and
    its base, the fp checkpoint it was quantized from (the checkpoint itself for an fp one), so that quantized
    results can be set against the fp result of the same model."""
    info = {"checkpoint": str(source), "kind": "fp", "recipe": None, "base": str(source)}
    if not str(source).endswith(".ckpt") or not Path(source).exists():
        return info
    from qmamba.models.loading import CHECKPOINT_KEY

    ckpt = torch.load(source, map_location="cpu", weights_only=False, mmap=True)
    entry = ckpt.get(CHECKPOINT_KEY) or {}
    if entry.get("config"):
        from qmamba.config import MambaConfig
        from qmamba.models import MambaLM

        with torch.device("meta"):  # the size without building the weights
            info["params"] = MambaLM(MambaConfig.from_dict(entry["config"])).num_parameters()
        info["layer"] = entry["config"].get("layer")
    if entry.get("recipe"):
        info["kind"] = "int8" if entry.get("int8") else "prepared"
        info["recipe"] = entry["recipe"].get("name")
        init_from = (ckpt.get("hyper_parameters") or {}).get("init_from")
        if init_from:
            info["base"] = str(init_from)
    return info


def supported_modes(module: LMModule) -> tuple[str, ...]:
    """The modes a loaded model can run in: fp only for an fp model; all three once prepared and calibrated;
    int8 and fakequant (from the dequantized int8 weights) for a converted model."""
    if is_converted(module.model):
        return ("int8", "fakequant")
    if is_prepared(module.model):
        return MODES
    return ("fp",)


def check_backend(backend: str) -> None:
    if backend == "cuda" and not (torch.cuda.is_available() and try_import("mamba_ssm") is not None):
        why = "no CUDA GPU is visible" if not torch.cuda.is_available() else "`import mamba_ssm` fails"
        raise ValueError(f"--backend cuda cannot load here: {why}. Use --backend torch (the reference, any device) "
                         'or auto; on a GPU install the kernels with pip install "qmamba[cuda]"')


def evaluate(source: str, modes: str | list[str] = "fp", split: str = "test", data: dict[str, Any] | None = None,
             backend: str = "auto", accelerator: str = "auto", limit_batches: int | float = 1.0,
             logger: Any = None) -> list[EvalResult]:
    """Score the model at ``source`` (a ``.ckpt``, a model folder or a hub id) on ``split`` in each of ``modes``
    ("all" = every mode the checkpoint supports). ``data`` overrides the datamodule settings stored in the
    checkpoint (corpus, tokenizer, seq_len ...)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    check_backend(backend)
    settings = {**data_config_of(source), **(data or {})}
    datamodule = TextDataModule(**settings)
    module = LMModule(init_from=str(source), backend=backend, sample_tokens=0)
    supported = supported_modes(module)
    wanted = list(supported) if modes == "all" else [parse_mode(m) for m in
                                                     ([modes] if isinstance(modes, str) else modes)]
    for mode in wanted:
        if mode not in supported:
            kind = "an int8" if is_converted(module.model) else ("a prepared" if is_prepared(module.model) else "an fp")
            raise ValueError(f"{source} holds {kind} model, which runs in {', '.join(supported)}; mode {mode!r} "
                             + ("needs a calibrated (prepared) or int8 checkpoint, e.g. from "
                                "`python train.py --config configs/ptq.yaml`" if kind == "an fp" else
                                "needs the fp / prepared checkpoint it came from"))
    results = []
    for mode in wanted:
        set_mode(module.model, mode)
        trainer = L.Trainer(accelerator=accelerator, devices=1, logger=logger if logger is not None else False,
                            enable_checkpointing=False, enable_model_summary=False, limit_test_batches=limit_batches,
                            limit_val_batches=limit_batches)
        start = time.perf_counter()
        if split == "test":
            trainer.test(module, datamodule=datamodule, verbose=False)
            prefix = "test"
        else:
            trainer.validate(module, datamodule=datamodule, verbose=False)
            prefix = "val"
        seconds = time.perf_counter() - start
        m = trainer.callback_metrics
        results.append(EvalResult(mode=mode, split=split, tokens=int(m[f"{prefix}/tokens"]),
                                  perplexity=float(m[f"{prefix}/ppl"]), bits_per_byte=float(m[f"{prefix}/bpb"]),
                                  seconds=seconds))
    return results


def agreement(source: str, data: dict[str, Any] | None = None, backend: str = "auto",
              device: str | None = None, batches: int = 1,
              forcings: tuple[str, ...] = ("op",)) -> dict[str, list]:
    """The fakequant-vs-int8 agreement report of a prepared or int8 checkpoint on its first test batch(es), for each
    teacher forcing asked ("op", "block"; see ``qmamba.qnn.agreement_report``), the model and data loaded once."""
    from qmamba.qnn import agreement_report

    check_backend(backend)
    module = LMModule(init_from=str(source), backend=backend, sample_tokens=0)
    if not is_prepared(module.model):
        raise ValueError(f"{source} is an fp model: the agreement report needs a calibrated or int8 checkpoint")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = module.model.to(device).eval()
    datamodule = TextDataModule(**{**data_config_of(source), **(data or {})})
    datamodule.setup("test")
    rows: dict[str, list] = {forcing: [] for forcing in forcings}
    for i, (x, _, _) in enumerate(datamodule.test_dataloader()):
        if i >= batches:
            break
        for forcing in forcings:
            rows[forcing] += agreement_report(model, x.to(device), forcing=forcing)
    return rows
