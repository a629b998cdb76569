"""Loading any model source into the form its checkpoint was saved in: fp, quantization-prepared (recipe + scales),
or int8 (converted weights). The quantization config travels inside the checkpoint (``checkpoint["qmamba"]``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from qmamba.config import MambaConfig
from qmamba.models import MambaLM, load_model
from qmamba.models.loading import CHECKPOINT_KEY, checkpoint_state, load_state_strict
from qmamba.qnn import int8_layout_, is_converted, is_prepared, prepare


def checkpoint_entry(model: MambaLM) -> dict:
    """What a checkpoint must carry to rebuild ``model``: its config, and its recipe / int8 state if quantized."""
    entry = {"config": model.config.to_dict()}
    if is_prepared(model):
        entry["recipe"] = model.quant_recipe.to_dict()
        entry["int8"] = is_converted(model)
    return entry


def load_checkpoint_model(source: str | os.PathLike) -> MambaLM:
    """A model from a qmamba .ckpt (fp, prepared or int8), a model folder or a hub id."""
    path = Path(source)
    if path.suffix != ".ckpt":
        return load_model(source)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; train one first, e.g. "
                                "`python train.py --config configs/pretrain.yaml`")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    entry = ckpt.get(CHECKPOINT_KEY)
    if entry is None:
        raise ValueError(f"{path} is not a qmamba checkpoint (no '{CHECKPOINT_KEY}' entry)")
    if not entry.get("recipe"):
        return load_model(path)
    model = prepare(MambaLM(MambaConfig.from_dict(entry["config"])), entry["recipe"])
    if entry.get("int8"):
        int8_layout_(model)
    state = checkpoint_state(ckpt)
    for name, param in model.named_parameters():
        if param.dtype == torch.int8 and name in state and state[name].dtype != torch.int8:
            raise ValueError(f"{path} says int8 but holds {state[name].dtype} weights at {name}; the file is "
                             "inconsistent — regenerate it with the Finalize callback")
    return load_state_strict(model, state, str(path), what="quantized state does not fit its recipe")
