"""Lightning glue: the LM module, its metrics and the command-line helpers."""

from qmamba.lightning.checkpoint import checkpoint_entry, load_checkpoint_model
from qmamba.lightning.metrics import LMMetrics
from qmamba.lightning.module import LMModule

__all__ = ["LMMetrics", "LMModule", "checkpoint_entry", "load_checkpoint_model"]
