"""Stage 2: train the vision tower against stored caption embeddings (loop, optimizer groups and layer
decay, schedule, precision, checkpoints, distributed)."""

from .config import RunConfig
from .loop import fit

__all__ = ["RunConfig", "fit"]
