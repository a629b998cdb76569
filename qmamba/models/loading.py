"""Loading and saving models: mamba_ssm folders, Hugging Face ``-hf`` folders, hub ids and our Lightning checkpoints.

Accepted sources (``load_model``):
- a Lightning checkpoint written by qmamba (``*.ckpt``; its config travels inside it);
- a folder in mamba_ssm's layout: ``config.json`` (``d_model``, ``n_layer``, ``ssm_cfg`` ...) + ``pytorch_model.bin``;
- a folder in transformers' layout: ``config.json`` with ``model_type`` mamba / mamba2 + ``model.safetensors`` or
  ``pytorch_model.bin``, keys ``backbone.embeddings.*`` (renamed to mamba_ssm's ``backbone.embedding.*``);
- a Hugging Face hub id (``state-spaces/mamba-130m``, ``state-spaces/mamba-130m-hf``): downloaded with
  huggingface_hub (honours its cache and ``HF_HUB_OFFLINE``), then read as one of the two folder layouts.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from qmamba.config import MambaConfig
from qmamba.models.lm import MambaLM

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CHECKPOINT_KEY = "qmamba"  # where a Lightning checkpoint keeps the model config


def save_pretrained(model: MambaLM, folder: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``pytorch_model.bin`` in mamba_ssm's layout (loadable by ``MambaLMHeadModel``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_mamba_ssm(), indent=2))
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "pytorch_model.bin")
    return folder


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        path = folder / name
        if path.exists():
            if name.endswith(".safetensors"):
                try:
                    from safetensors.torch import load_file
                except ImportError as e:
                    raise ImportError(f"{path} needs the package `safetensors`: pip install safetensors") from e
                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} has no weights: expected one of {', '.join(WEIGHT_FILES)}")


def convert_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers key names -> mamba_ssm key names (only the embedding differs)."""
    return {re.sub(r"^backbone\.embeddings\.", "backbone.embedding.", k): v for k, v in state.items()}


def _load_folder(folder: Path) -> MambaLM:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{folder} has no config.json: expected a mamba_ssm or Hugging Face model folder")
    raw = json.loads(cfg_path.read_text())
    is_hf = "model_type" in raw
    cfg = MambaConfig.from_hf(raw) if is_hf else MambaConfig.from_mamba_ssm(raw)
    state = _read_weights(folder)
    if is_hf:
        state = convert_hf_state_dict(state)
    return model_from_state_dict(cfg, state, source=str(folder))


def model_from_state_dict(cfg: MambaConfig, state: dict[str, torch.Tensor], source: str = "state dict") -> MambaLM:
    """Build a model and load ``state`` (mamba_ssm key names) strictly; a tied lm_head may be absent."""
    return load_state_strict(MambaLM(cfg), state, source)


def load_state_strict(model: MambaLM, state: dict[str, torch.Tensor], source: str = "state dict",
                      what: str = "weights do not fit the config") -> MambaLM:
    """Load ``state`` into ``model`` strictly, with errors that name ``source``: shapes first (load_state_dict's own
    RuntimeError names no file), then missing / unexpected keys. A tied lm_head may be absent."""
    state = dict(state)
    tied = model.config.tie_embeddings
    if tied:
        state.pop("lm_head.weight", None)  # the same tensor as the embedding
    expected = model.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} in the weights, {tuple(expected[k].shape)} in the config"
             for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{source}: {what}. shape mismatches: {wrong[:8]}{' ...' if len(wrong) > 8 else ''}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if tied:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{source}: {what}. missing keys: {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
                         f"unexpected keys: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    return model


def _download(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        cfg = hf_hub_download(repo_id, "config.json")
    except Exception as e:
        raise FileNotFoundError(f"could not get {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
                                "If this is a local path, check it exists; if you are offline, download the model "
                                "elsewhere and pass its folder (config.json + pytorch_model.bin).") from e
    for name in WEIGHT_FILES:
        try:
            hf_hub_download(repo_id, name)
            break
        except Exception:
            continue
    else:
        raise FileNotFoundError(f"hub repo {repo_id!r} has none of {WEIGHT_FILES}")
    return Path(cfg).parent


def from_pretrained(source: str | os.PathLike) -> MambaLM:
    """A model from a local mamba_ssm / transformers folder, or a hub id (see module docstring)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path)
    if path.exists():
        raise ValueError(f"{path} is a file; from_pretrained wants a model folder (config.json + weights), "
                         "or use load_model for a .ckpt")
    if _HUB_ID.match(str(source)) and not str(source).startswith((".", "~")):
        return _load_folder(_download(str(source)))
    raise FileNotFoundError(f"model source {str(source)!r} does not exist (not a folder, not a hub id like "
                            "'state-spaces/mamba-130m')")


def load_lightning_checkpoint(path: str | os.PathLike) -> tuple[MambaLM, dict]:
    """The model of a qmamba Lightning checkpoint, and the checkpoint dict (for hyper-parameters, recipe ...)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if CHECKPOINT_KEY not in ckpt:
        raise ValueError(f"{path} is not a qmamba checkpoint (no '{CHECKPOINT_KEY}' entry); for a mamba_ssm or "
                         "Hugging Face model give its folder or hub id instead")
    if ckpt[CHECKPOINT_KEY].get("recipe"):
        kind = "an int8" if ckpt[CHECKPOINT_KEY].get("int8") else "a quantization-prepared"
        raise ValueError(f"{path} is {kind} checkpoint (recipe {ckpt[CHECKPOINT_KEY]['recipe'].get('name')!r}); "
                         "load it with qmamba.lightning.load_checkpoint_model (evaluate.py does), not as an fp model")
    cfg = MambaConfig.from_dict(ckpt[CHECKPOINT_KEY]["config"])
    return model_from_state_dict(cfg, checkpoint_state(ckpt), source=str(path)), ckpt


def checkpoint_state(ckpt: dict) -> dict[str, torch.Tensor]:
    """The model's entries of a Lightning checkpoint's state dict (the ``model.`` prefix removed)."""
    return {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


def load_model(source: str | os.PathLike) -> MambaLM:
    """A model from any source: a qmamba ``.ckpt``, a model folder, or a hub id."""
    path = Path(source).expanduser()
    if path.suffix == ".ckpt":
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist; train one first, e.g. "
                                    "`python train.py --config configs/pretrain.yaml`")
        return load_lightning_checkpoint(path)[0]
    return from_pretrained(source)
