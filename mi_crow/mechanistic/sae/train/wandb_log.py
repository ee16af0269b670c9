"""Optional Weights & Biases logging of a training run (``SaeTrainingConfig(use_wandb=True)``).

The ``wandb`` package is an optional dependency (``pip install wandb`` or ``pip install 'mi_crow[wandb]'``); it is
imported only when a run asks for it. Every record the trainer appends to the history is logged at its optimizer
step, and the run's configuration (``runs/<id>/config.json``) becomes the W&B run config. ``WANDB_MODE=offline``
(W&B's own switch) writes the run to a local folder (``WANDB_DIR``) without any network; ``wandb sync`` uploads it
later. A resumed training run logs the records after its checkpoint to a new W&B run.
"""

from __future__ import annotations

import logging
import numbers
import os
from typing import Any

from mi_crow.errors import MiCrowError

__all__ = ["WandbNotInstalledError", "WandbRun", "require_wandb"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install wandb (or pip install 'mi_crow[wandb]')"
DEFAULT_PROJECT = "mi_crow"


class WandbNotInstalledError(MiCrowError, ImportError):
    """``use_wandb=True`` but the ``wandb`` package cannot be imported; the message names the pip command."""


def require_wandb() -> Any:
    """Import and return the ``wandb`` module.

    Raises:
        WandbNotInstalledError: the package is not installed (or fails to import); the message says how to install
            it.
    """
    try:
        import wandb
    except ImportError as exc:
        raise WandbNotInstalledError(
            f"SaeTrainingConfig.use_wandb=True needs the wandb package, which cannot be imported ({exc}); install it "
            f"with: {INSTALL_HINT}, or set use_wandb=False"
        ) from exc
    return wandb


class WandbRun:
    """One W&B run fed with the trainer's history records.

    Args:
        wandb: the module from `require_wandb`.
        project: project name (None: ``WANDB_PROJECT`` or ``"mi_crow"``).
        name: run name.
        config: the run configuration to record.
    """

    def __init__(self, wandb: Any, project: str | None, name: str, config: dict[str, Any]) -> None:
        project = project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        self.run = wandb.init(project=project, name=name, config=config)
        logger.info("logging training to W&B project %r, run %r", project, name)

    def log(self, record: dict[str, Any]) -> None:
        """Log the numeric values of one history record at its step."""
        values = {
            key: value
            for key, value in record.items()
            if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool)
        }
        self.run.log(values, step=int(record["step"]))

    def finish(self, failed: bool = False) -> None:
        """Close the run (marked failed when training raised)."""
        self.run.finish(exit_code=1 if failed else 0)
