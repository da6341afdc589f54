"""The chain rule: when a task's segment chain agrees with its whole graph (numpy only).

Running a task's segments one after another must give its graph's logits: max |logit
difference| within :data:`ATOL` times the logits' scale (:func:`logit_scale`) and the same
arg-max on at least :data:`MIN_ARGMAX_AGREEMENT` of the rows. Export's parity check,
``--verify-only`` (:mod:`export.chain`) and the server's start-up check
(:meth:`mutask.serving.engine.Engine.verify`) all judge by :func:`agreement`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ATOL", "MIN_ARGMAX_AGREEMENT", "Agreement", "agreement", "logit_scale"]

# max |logit difference|, per unit of the logits' own scale: float32 sums round in proportion to
# their size, so logits of magnitude 20 (a trained conv head) may differ by 20x what logits of
# magnitude 1 do between two correct runtimes (seen: 3e-4 between a chain and its whole graph)
ATOL = 1e-4
MIN_ARGMAX_AGREEMENT = 0.999


@dataclass(frozen=True)
class Agreement:
    """How far two sets of logits are apart, and whether that is within the bounds."""

    max_abs_diff: float
    argmax_agreement: float
    ok: bool


def agreement(got: np.ndarray, ref: np.ndarray, atol: float = ATOL, min_argmax: float = MIN_ARGMAX_AGREEMENT) -> Agreement:
    """``got`` against ``ref`` (rows of logits): max |difference|, share of rows with the same
    arg-max, and ``ok`` when both are within the bounds (the artifact's: :data:`ATOL`,
    :data:`MIN_ARGMAX_AGREEMENT`; a caller on another device may pass its own). Never ``ok``
    for different shapes or non-finite values."""
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape or got.ndim != 2:
        return Agreement(float("inf"), 0.0, False)
    diff = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()) if got.size else 0.0
    agree = float((got.argmax(1) == ref.argmax(1)).mean()) if len(got) else 1.0
    return Agreement(diff, agree, bool(diff <= atol * logit_scale(ref) and agree >= min_argmax))


def logit_scale(ref: np.ndarray) -> float:
    """What :data:`ATOL` is multiplied by: the largest |logit| of ``ref``, at least 1 (so logits
    within [-1, 1] keep the absolute bound)."""
    ref = np.asarray(ref)
    return max(1.0, float(np.abs(ref).max())) if ref.size and np.isfinite(ref).all() else 1.0
