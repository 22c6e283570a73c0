"""Loss descriptors (no compiled code here, so importing them is cheap).

The kernels in ``solver.py`` branch on ``Loss.code``; ``gamma`` is the smoothing width of the
margin family (0 = the hinge)."""

from __future__ import annotations

from dataclasses import dataclass

from fedmtl.errors import ConfigError

# Loss family codes used inside the kernels (compile-time constants for numba).
MARGIN = 0  # hinge (gamma = 0) and smoothed hinge (gamma > 0); labels in {-1, +1}
SQUARED = 1  # 0.5 (z - y)^2; real targets


@dataclass(frozen=True)
class Loss:
    """A convex loss as the kernels see it: a family code and its smoothing parameter."""

    name: str
    code: int
    gamma: float
    kind: str  # "classification" or "regression"

    @property
    def smooth(self) -> bool:
        """Smooth losses converge linearly; the hinge only at rate 1/epsilon."""
        return self.code == SQUARED or self.gamma > 0


LOSS_NAMES = ("hinge", "smooth_hinge", "squared")


def get_loss(name: str, gamma: float = 1.0) -> Loss:
    """Look a loss up by name; ``gamma`` is the smoothing width of ``smooth_hinge``."""
    losses = {
        "hinge": Loss("hinge", MARGIN, 0.0, "classification"),
        "smooth_hinge": Loss("smooth_hinge", MARGIN, float(gamma), "classification"),
        "squared": Loss("squared", SQUARED, 0.0, "regression"),
    }
    if name not in losses:
        raise ConfigError(f"config: algorithm.loss = {name!r}: unknown loss; allowed: {', '.join(losses)}")
    if name == "smooth_hinge" and not gamma > 0:
        raise ConfigError(f"config: algorithm.gamma = {gamma!r}: smooth_hinge needs gamma > 0")
    return losses[name]
