"""Lightning callbacks of the quantization pipeline. Use them in a config's ``trainer.callbacks`` (see configs/ptq.yaml,
configs/qat.yaml), in this order: Calibration, QAT, ModeValidation, Finalize.

- ``Calibration``: swaps in the quantizable twins in ``setup`` (idempotent, so a resumed run has its observer and
  scale buffers before the checkpoint's weights load), then runs the calibration batches once, with a progress bar,
  and freezes the scales. Works alone (PTQ) or before QAT.
- ``QAT``: trains in fakequant mode; learnable scales get their own learning rate and may be frozen after a step.
- ``ModeValidation``: after each validation, validates again in other modes and logs ``val_<mode>/{ppl,bpb}``, so the
  fp / fakequant / int8 gap is seen live.
- ``Finalize``: at the end of fit, converts to int8 layers and saves an int8 checkpoint carrying its recipe; it
  loads without any callback (``evaluate.py --mode int8``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import torch

from qmamba.lightning.checkpoint import checkpoint_entry
from qmamba.lightning.metrics import LMMetrics
from qmamba.models import set_backend
from qmamba.models.loading import CHECKPOINT_KEY, load_model
from qmamba.modes import parse_mode
from qmamba.qnn import calibrate, convert, current_mode, is_calibrated, prepare, quant_points, set_mode
from qmamba.quant.recipe import load_recipe


class Calibration(L.Callback):
    """Args:
        recipe: a preset name (quamba_w8a8, quamba2_w8a8, qat_w8a8) or a recipe .yaml.
        num_batches: calibration batches from the datamodule's ``calibration_dataloader()`` (None = all of it).
    """

    def __init__(self, recipe: str = "quamba_w8a8", num_batches: int | None = None):
        self.recipe = load_recipe(recipe)
        self.num_batches = num_batches

    def setup(self, trainer, pl_module, stage: str) -> None:
        prepare(pl_module.model, self.recipe)

    def _ensure_calibrated(self, trainer, pl_module) -> None:
        if is_calibrated(pl_module.model):  # resumed, or loaded from a calibrated checkpoint
            return
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "calibration_dataloader"):
            raise ValueError("the Calibration callback needs a datamodule with calibration_dataloader() "
                             "(qmamba.data.TextDataModule)")
        seen = calibrate(pl_module.model, dm.calibration_dataloader(), max_batches=self.num_batches,
                         progress=trainer.progress_bar_callback is not None)
        if trainer.logger is not None:  # the run's config says which recipe made its scales
            trainer.logger.log_hyperparams({"recipe": self.recipe.to_dict(), "calibration_batches": seen})
        pl_module.print(f"calibrated {sum(1 for p in quant_points(pl_module.model) if not p.is_weight)} activation "
                        f"scales on {seen} batches (recipe {self.recipe.name})")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._ensure_calibrated(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._ensure_calibrated(trainer, pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._ensure_calibrated(trainer, pl_module)


class QAT(L.Callback):
    """Fake-quant training. Args:
        scale_lr: learning rate of learnable scales (their own AdamW group, no weight decay).
        freeze_scales_at_step: stop learning the scales from this global step on (None = never).
        distill: weight of the distillation term: the loss is ``(1 - distill) * cross-entropy + distill *
            KL(teacher || student)``; 0 trains on cross-entropy alone. Distilling from the fp model keeps QAT
            aiming at the fp model's predictions instead of fitting the training text further (a pretrained model
            fine-tuned on its own corpus overfits).
        teacher: the fp model to distill from: a checkpoint, model folder or hub id; default the module's
            ``init_from`` (the weights QAT starts from, loaded afresh, so a resumed run has the same teacher).
    """

    def __init__(self, scale_lr: float = 1e-4, freeze_scales_at_step: int | None = None, distill: float = 0.0,
                 teacher: str | None = None):
        if not 0 <= distill <= 1:
            raise ValueError(f"QAT distill must be in [0, 1] (0 = cross-entropy only), got {distill}")
        self.scale_lr = scale_lr
        self.freeze_scales_at_step = freeze_scales_at_step
        self.distill, self.teacher = distill, teacher

    def setup(self, trainer, pl_module, stage: str) -> None:
        pl_module.scale_lr = self.scale_lr  # read by LMModule.configure_optimizers
        if self.distill > 0 and stage == "fit":
            source = self.teacher or pl_module.hparams.get("init_from")
            if not source:
                raise ValueError("QAT distill needs a teacher: set the QAT callback's `teacher` (an fp checkpoint) "
                                 "or start from trained weights with model.init_args.init_from")
            teacher = load_model(source)  # fp weights only: a quantized checkpoint is refused, named
            set_backend(teacher, pl_module.hparams.get("backend", "auto"))
            if teacher.config != pl_module.model.config:
                raise ValueError(f"the distillation teacher {source} is a different model from the one trained "
                                 "(configs differ); point `teacher` at the fp checkpoint QAT starts from")
            pl_module.set_teacher(teacher, self.distill)

    def on_fit_start(self, trainer, pl_module) -> None:
        set_mode(pl_module.model, "fakequant")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.freeze_scales_at_step is not None and trainer.global_step == self.freeze_scales_at_step:
            for point in quant_points(pl_module.model):
                if isinstance(point.scale, torch.nn.Parameter):
                    point.scale.requires_grad_(False)


class ModeValidation(L.Callback):
    """Validate again in each of ``modes`` (besides the model's current mode) after every validation."""

    def __init__(self, modes: list[str] = ("fp", "fakequant", "int8")):
        self.modes = [parse_mode(m) for m in modes]

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        model, base = pl_module.model, current_mode(pl_module.model)
        loader = trainer.val_dataloaders
        limit = trainer.num_val_batches[0] if trainer.num_val_batches else None
        try:
            for mode in self.modes:
                if mode == base:
                    continue
                set_mode(model, mode)
                metrics = LMMetrics(model.config.vocab_size).to(pl_module.device)
                for i, (x, y, nbytes) in enumerate(loader):
                    if limit is not None and i >= limit:
                        break
                    metrics.update(model(x.to(pl_module.device)), y.to(pl_module.device), nbytes.to(pl_module.device))
                values = metrics.compute()
                pl_module.log(f"val_{mode}/ppl", values["ppl"])
                pl_module.log(f"val_{mode}/bpb", values["bpb"])
                pl_module.print(f"  {mode:9s} val ppl {values['ppl']:.4f}  bpb {values['bpb']:.4f}")
        finally:
            set_mode(model, base)


class Finalize(L.Callback):
    """At the end of fit: take the best checkpoint's weights (the last ones if none), convert them to int8 layers and
    save ``path``: an int8 checkpoint with its config, recipe and data settings. The live model is left as it was,
    so the test after fit still runs on the best checkpoint."""

    def __init__(self, path: str = "runs/qat/checkpoints/int8.ckpt", prepared_path: str | None = None):
        self.path = path
        self.prepared_path = prepared_path  # also save the calibrated, not yet converted model here (all 3 modes)

    def on_fit_end(self, trainer, pl_module) -> None:
        model = copy.deepcopy(pl_module.model)
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        if best:
            state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
            model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
        if self.prepared_path:
            self._save(trainer, pl_module, model, self.prepared_path, best)
        convert(model)
        self._save(trainer, pl_module, model, self.path, best)

    @staticmethod
    def _save(trainer, pl_module, model, path: str, best: str) -> None:
        dm = trainer.datamodule
        ckpt = {"state_dict": {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()},
                CHECKPOINT_KEY: checkpoint_entry(model), "hyper_parameters": dict(pl_module.hparams),
                "datamodule_hyper_parameters": dict(getattr(dm, "hparams", {}) or {}),
                "global_step": trainer.global_step, "source_checkpoint": best or None}
        if trainer.is_global_zero:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            torch.save(ckpt, path)
            kind = "int8" if ckpt[CHECKPOINT_KEY].get("int8") else "calibrated (prepared)"
            pl_module.print(f"{kind} checkpoint ({'best' if best else 'last'} weights): {path}")
