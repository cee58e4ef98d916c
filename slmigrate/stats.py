"""95% intervals for the figures slmigrate decides on: the probe's measured replaceability and evaluate's
migrate decision share these, so one figure means the same wherever it is shown.

- ``wilson``: a proportion (every per-call score is 0 or 1: exact match, label match); sound at 0/n and n/n,
  unlike the normal approximation.
- ``bootstrap_mean``: the mean of graded scores (ROUGE-L, field accuracy), a percentile bootstrap with a fixed
  seed, so the same scores always give the same interval.
- ``hoeffding``: graded scores fewer than ``BOOTSTRAP_MIN_N``, where a bootstrap of two equal scores would claim
  certainty; distribution-free for any scores in [0, 1].
- ``estimate`` picks one of the three for a list of per-call scores; ``calls_needed`` says how many calls a
  perfect score needs before its lower bound can reach a threshold at all.
"""

from __future__ import annotations

import math
from typing import Any

Z95 = 1.959964
# Below this many graded scores the bootstrap is not trusted: it resamples what little was seen, so two equal
# scores give a zero-width interval. Hoeffding's bound holds for any scores in [0, 1] at any n.
BOOTSTRAP_MIN_N = 30


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion (sound at 0/n and n/n, unlike the normal approximation)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean(values: list[float], seed: int = 0, rounds: int = 2000) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean (``seed`` fixed: the same scores give the same interval)."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return 0.0, 1.0
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(rounds, len(x)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def hoeffding(mean: float, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Distribution-free 95% interval of a mean of n scores in [0, 1] (Hoeffding's inequality, two-sided)."""
    half = math.sqrt(math.log(2 / alpha) / (2 * n))
    return max(0.0, mean - half), min(1.0, mean + half)


def estimate(values: list[float | None], seed: int = 0) -> dict[str, Any] | None:
    """Mean of the in-scope item scores with its 95% interval: Wilson when every score is 0 or 1, else a
    bootstrap of the mean, or Hoeffding's bound when there are fewer than ``BOOTSTRAP_MIN_N`` scores.

    Returns ``{"score", "low", "high", "n", "interval"}`` (``interval`` names the method), or None when no item
    was in scope.
    """
    scoped = [float(v) for v in values if v is not None]
    if not scoped:
        return None
    mean = sum(scoped) / len(scoped)
    if all(v in (0.0, 1.0) for v in scoped):
        (low, high), method = wilson(sum(scoped), len(scoped)), "wilson"
    elif len(scoped) < BOOTSTRAP_MIN_N:
        (low, high), method = hoeffding(mean, len(scoped)), "hoeffding"
    else:
        (low, high), method = bootstrap_mean(scoped, seed), "bootstrap"
    return {"score": round(mean, 4), "low": round(low, 4), "high": round(high, 4), "n": len(scoped),
            "interval": method}


def calls_needed(threshold: float) -> int | None:
    """The fewest calls on which a perfect score (n of n) has a Wilson lower bound of at least ``threshold``;
    None when no number of calls can (a threshold of 1 or more: a lower bound never reaches 1).

    The Wilson lower bound of n/n is n / (n + z^2), so n >= threshold * z^2 / (1 - threshold); 35 calls for 0.9,
    73 for 0.95. A perfect score is all 0/1, so this holds for graded metrics too (``estimate`` takes Wilson then).
    The closed form is checked against ``wilson`` itself, so the two never disagree by a rounding.
    """
    if threshold >= 1:
        return None
    if threshold <= 0:
        return 1
    n = max(1, math.ceil(threshold * Z95 * Z95 / (1 - threshold)) - 1)
    while wilson(n, n)[0] < threshold:
        n += 1
    while n > 1 and wilson(n - 1, n - 1)[0] >= threshold:
        n -= 1
    return n
