"""qmamba: train, calibrate, QAT-fine-tune and finalize Mamba1 / Mamba2 language models into int8 layers.

Importing qmamba never imports mamba_ssm, causal_conv1d or compiled kernels: fast paths load on first use on a GPU.
"""

from qmamba.config import PRESETS, MambaConfig, preset
from qmamba.models import MambaLM, from_pretrained, load_model, save_pretrained, set_backend

__version__ = "0.1.0"
__all__ = ["PRESETS", "MambaConfig", "preset", "MambaLM", "from_pretrained", "load_model", "save_pretrained",
           "set_backend"]
