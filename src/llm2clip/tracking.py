"""Experiment logging: the rows a run writes to metrics.jsonl, forwarded to TensorBoard and/or wandb.

metrics.jsonl stays the record; these are views of it. Both packages are imported only when a run asks
for them (``logging: {tensorboard: true, wandb: {project: ..., mode: offline}}`` in a stage-1 or stage-2
config), and a missing one is a one-line ConfigError naming ``pip install 'llm2clip[logging]'``.
Only rank 0 logs. Nested values (``{"eval": {"dense/t2i_R@1": 0.4}}``) become ``eval/dense/t2i_R@1``;
``step`` is the x axis; text, booleans and None are not scalars and are left out.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

from pydantic import Field

from .config import StrictModel
from .errors import ConfigError

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'llm2clip[logging]'"
TENSORBOARD_DIR = "tensorboard"  # inside the run folder


class WandbConfig(StrictModel):
    project: str
    mode: Literal["online", "offline", "disabled"] = Field("offline", description=(
        "offline: sync later with `wandb sync`"))
    entity: str | None = None
    name: str | None = Field(None, description="run name (default: the run folder's name)")
    tags: list[str] = Field(default_factory=list)


class LoggingConfig(StrictModel):
    """Where a run's metrics go besides metrics.jsonl."""

    tensorboard: bool = Field(False, description="event files in <run folder>/tensorboard")
    wandb: WandbConfig | None = None

    @property
    def enabled(self) -> bool:
        return self.tensorboard or self.wandb is not None


def scalars(row: dict, prefix: str = "") -> dict[str, float]:
    """The numeric values of a metrics row, nested keys joined with '/', ``step`` left out."""
    out: dict[str, float] = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(scalars(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and key != "step" and math.isfinite(v):
            out[key] = float(v)
    return out


class Tracker:
    """Forwards metrics rows to the configured backends; a no-op without any."""

    def __init__(self, cfg: LoggingConfig | None, run_dir: str | Path, config: dict | None = None,
                 enabled: bool = True):
        self.tb = self.wandb_run = None
        if cfg is None or not cfg.enabled or not enabled:
            return
        run_dir = Path(run_dir)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(f"logging.tensorboard needs the tensorboard package: {INSTALL_HINT}") from None
            self.tb = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))
        if cfg.wandb is not None:
            try:
                import wandb
            except ImportError:
                self.close()
                raise ConfigError(f"logging.wandb needs the wandb package: {INSTALL_HINT}") from None
            w = cfg.wandb
            self.wandb_run = wandb.init(project=w.project, entity=w.entity, name=w.name or run_dir.name,
                                        tags=w.tags or None, mode=w.mode, dir=str(run_dir), config=config)

    def log(self, row: dict) -> None:
        if self.tb is None and self.wandb_run is None:
            return
        values, step = scalars(row), row.get("step")
        if not values:
            return
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, global_step=step)
            self.tb.flush()  # a killed run keeps what it logged, as metrics.jsonl does
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
