"""Mamba1 / Mamba2 language models with mamba_ssm's parameter names, built from swappable parts."""

from qmamba.models.lm import Block, MambaLM, MixerModel
from qmamba.models.loading import from_pretrained, load_model, save_pretrained
from qmamba.models.mamba1 import Mamba1Mixer
from qmamba.models.mamba2 import Mamba2Mixer
from qmamba.models.parts import CausalConv1d, RMSNorm, RMSNormGated, SelectiveScan, SSDScan, set_backend

__all__ = ["Block", "MambaLM", "MixerModel", "Mamba1Mixer", "Mamba2Mixer", "CausalConv1d", "RMSNorm", "RMSNormGated",
           "SelectiveScan", "SSDScan", "set_backend", "from_pretrained", "load_model", "save_pretrained"]
