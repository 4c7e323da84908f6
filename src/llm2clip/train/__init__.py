"""Stage 2: train the vision tower against stored caption embeddings (loop, optimizer groups and layer
decay, schedule, precision, checkpoints, distributed).

Names load on first use, so building the command line does not import torch for this package."""

from ..lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {"config": ["RunConfig"], "loop": ["fit"]})
