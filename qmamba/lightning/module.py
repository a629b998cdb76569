"""The LightningModule: next-token training of a Mamba LM, validation / test perplexity and bits per byte, AdamW
with linear warmup and cosine decay, and a generated sample at the end of validation."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from qmamba.config import MambaConfig, preset
from qmamba.data import IGNORE_INDEX
from qmamba.lightning.metrics import LMMetrics
from qmamba.lightning.checkpoint import checkpoint_entry, load_checkpoint_model
from qmamba.models import MambaLM, set_backend
from qmamba.models.loading import CHECKPOINT_KEY


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, summed over the vocabulary, averaged over the
    positions that have a target (padding, ``IGNORE_INDEX``, is left out as in the cross-entropy)."""
    keep = targets.flatten() != IGNORE_INDEX
    s = F.log_softmax(student.flatten(0, 1)[keep].float(), dim=-1)
    t = F.log_softmax(teacher.flatten(0, 1)[keep].float(), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="sum") / keep.sum().clamp_min(1)


class LMModule(L.LightningModule):
    """A Mamba language model under Lightning.

    Args:
        model: preset name (``qmamba.config.PRESETS``) of a freshly initialized model. Ignored when ``init_from``
            is set: the architecture then comes from that source.
        model_overrides: config fields to change on the preset, e.g. ``{n_layer: 8}``.
        init_from: start from trained weights: a qmamba ``.ckpt``, a mamba_ssm / Hugging Face folder, or a hub id.
        lr, weight_decay, betas: AdamW. Weight decay applies to matrices only (not norms, biases, A_log, D, dt_bias).
        warmup_steps, min_lr_ratio: linear warmup, then cosine decay to ``lr * min_lr_ratio`` at the last step.
        backend: op backend of the model's parts: "auto" (mamba_ssm kernels on a GPU when installed), "torch", "cuda".
        sample_tokens, sample_prompt, sample_temperature: a generated sample logged after each validation (0 = off).
    """

    def __init__(self, model: str | None = "demo", model_overrides: dict[str, Any] | None = None,
                 init_from: str | None = None, lr: float = 3e-3, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 100, min_lr_ratio: float = 0.1,
                 backend: str = "auto", sample_tokens: int = 200, sample_prompt: str = "ROMEO.",
                 sample_temperature: float = 0.8):
        super().__init__()
        self.save_hyperparameters()
        if init_from:
            if model_overrides:
                raise ValueError("model_overrides cannot change a model loaded with init_from; drop one of them")
            self.model = load_checkpoint_model(init_from)
        elif model is None:
            raise ValueError("give a model preset (model: demo, ...) or weights to start from (init_from: ...)")
        else:
            self.model = MambaLM(preset(model, **(model_overrides or {})))
        set_backend(self.model, backend)
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.metrics = torch.nn.ModuleDict({s: LMMetrics(self.config.vocab_size) for s in ("val", "test")})
        self._teacher: tuple[torch.nn.Module, float] | None = None  # (frozen fp model, distillation weight)

    def set_teacher(self, teacher: torch.nn.Module | None, weight: float = 1.0) -> None:
        """Distill from ``teacher`` (a frozen fp model; the QAT callback loads it): the training loss becomes
        ``(1 - weight) * cross-entropy + weight * KL(teacher || student)`` per token. The teacher is not a
        submodule: it is neither trained nor saved in checkpoints. ``None`` turns distillation off."""
        if teacher is None:
            self._teacher = None
            return
        if not 0 < weight <= 1:
            raise ValueError(f"distillation weight must be in (0, 1], got {weight}")
        teacher.eval().requires_grad_(False)
        self._teacher = (teacher, float(weight))

    @property
    def config(self) -> MambaConfig:
        return self.model.config

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    # ---- data checks ---------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "vocab_size") and dm.vocab_size > self.config.vocab_size:
            raise ValueError(f"the tokenizer has {dm.vocab_size} tokens but the model only {self.config.vocab_size}; "
                             f"set model.init_args.model_overrides: {{vocab_size: {dm.vocab_size}}} or use a "
                             "tokenizer that matches the model")

    # ---- steps ---------------------------------------------------------------------------------------------------
    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self(x)
        loss = self._loss(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        if self._teacher is not None:
            teacher, weight = self._teacher
            with torch.no_grad():
                target = teacher(x)
            kd = distillation_loss(logits, target, y)
            self.log("train/kd", kd)
            loss = (1 - weight) * loss + weight * kd
        return loss

    def _eval_step(self, stage: str, batch) -> None:
        x, y, nbytes = batch
        self.metrics[stage].update(self(x), y, nbytes)

    def validation_step(self, batch, batch_idx):
        self._eval_step("val", batch)

    def test_step(self, batch, batch_idx):
        self._eval_step("test", batch)

    def _log_epoch(self, stage: str) -> dict[str, float]:
        values = self.metrics[stage].compute()
        self.metrics[stage].reset()
        for name in ("loss", "ppl", "bpb"):
            self.log(f"{stage}/{name}", values[name], prog_bar=(name != "loss"), sync_dist=False)
        self.log(f"{stage}/tokens", values["tokens"])
        return values

    def on_validation_epoch_end(self) -> None:
        values = self._log_epoch("val")
        if self.trainer.sanity_checking:
            return
        self.print(f"step {self.global_step}: val loss {values['loss']:.4f}  ppl {values['ppl']:.4f}  "
                   f"bpb {values['bpb']:.4f}  ({int(values['tokens'])} tokens)")
        if self.hparams.sample_tokens > 0:
            self._log_sample()

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    # ---- a look at the model -------------------------------------------------------------------------------------
    def _log_sample(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "tokenizer") or not self.trainer.is_global_zero:
            return
        tok = dm.tokenizer
        prompt = torch.tensor([tok.encode(self.hparams.sample_prompt)], device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(0)
        ids = self.model.generate(prompt, self.hparams.sample_tokens, temperature=self.hparams.sample_temperature,
                                  context=getattr(dm.hparams, "seq_len", None), generator=gen)
        text = tok.decode(ids[0].tolist())
        self.print(f"\n--- sample after step {self.global_step} ---\n{text}\n---")
        logger = self.logger
        if logger is not None and hasattr(logger, "log_text"):
            logger.log_text(key="samples", columns=["step", "text"], data=[[self.global_step, text]])

    # ---- optimizer -----------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay, scales = [], [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if ".quant_points." in name:  # learnable quantization scales (QAT)
                scales.append(p)
            else:
                (no_decay if p.dim() < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
        hp = self.hparams
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if scales:  # the QAT callback sets scale_lr; scales never decay
            groups.append({"params": scales, "weight_decay": 0.0, "lr": getattr(self, "scale_lr", hp.lr)})
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(hp.warmup_steps, total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- checkpoints carry the model config (nothing is inferred from file names) -----------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = checkpoint_entry(self.model)

    def on_fit_start(self) -> None:
        if self._teacher is not None:  # set in setup (QAT callback); it follows the student to its device
            self._teacher[0].to(self.device)
        if self.logger is not None:
            self.logger.log_hyperparams({"model/params": self.model.num_parameters(),
                                         "model/config": self.config.to_dict()})
            experiment = getattr(self.logger, "experiment", None)
            if hasattr(experiment, "define_metric"):  # W&B: best-of summaries for the run table
                from qmamba.tracking import define_summary_metrics

                define_summary_metrics(experiment)
