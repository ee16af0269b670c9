"""The metrics window: per-step losses summed on the device between two log records (no host sync per step)."""

from __future__ import annotations

import time
from typing import Any

import torch

from mi_crow.mechanistic.sae.train.results import LossOutput

__all__ = ["MetricsWindow"]

_NAMES = ("loss", "fvu", "sse", "auxk", "l0")


class MetricsWindow:
    """Sums of the losses of the steps since the last log record, turned into one record by :meth:`record`.

    Args:
        device: where the float64 accumulators live (the SAE's device).
    """

    def __init__(self, device: torch.device) -> None:
        self.sums = {name: torch.zeros((), dtype=torch.float64, device=device) for name in _NAMES}
        self.steps = 0
        self.tokens = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        """Start timing the window's throughput now."""
        self._start = time.perf_counter()

    @torch.no_grad()
    def add(self, out: LossOutput) -> None:
        """Count one optimizer step's losses."""
        self.sums["loss"] += out.loss.detach()
        self.sums["fvu"] += out.fvu
        self.sums["sse"] += out.sse
        self.sums["auxk"] += out.auxk_loss
        self.sums["l0"] += out.l0
        self.steps += 1
        self.tokens += out.tokens

    def means(self, n_inputs: int) -> dict[str, float]:
        """Window means of the losses, the MSE per element and the throughput (the window must hold a step)."""
        sums, steps = self.sums, self.steps
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        return {
            "loss": float(sums["loss"]) / steps,
            "mse": float(sums["sse"]) / (self.tokens * n_inputs),
            "fvu": float(sums["fvu"]) / steps,
            "l0": float(sums["l0"]) / steps,
            "auxk_loss": float(sums["auxk"]) / steps,
            "tokens_per_s": self.tokens / elapsed,
        }

    def clear(self) -> None:
        """Empty the window (after a record was taken)."""
        for value in self.sums.values():
            value.zero_()
        self.steps = 0
        self.tokens = 0

    def to_checkpoint(self) -> dict[str, Any]:
        """The sums and counts as plain numbers, as the checkpoint's ``window`` entry holds them."""
        window: dict[str, Any] = {name: float(value) for name, value in self.sums.items()}
        window.update(steps=self.steps, tokens=self.tokens)
        return window

    def load_checkpoint(self, window: dict[str, Any]) -> None:
        """Continue the window a checkpoint saved (:meth:`to_checkpoint`)."""
        for name, value in self.sums.items():
            value.fill_(float(window[name]))
        self.steps = int(window["steps"])
        self.tokens = int(window["tokens"])
