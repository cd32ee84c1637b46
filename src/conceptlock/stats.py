"""Confidence intervals and paired comparisons for evaluation results.

Why this module exists: safety numbers in this field are rates over a few hundred prompts (142
UnlearnDiffAtk prompts, 931 I2P nudity prompts), so "6.1% vs 1.8%" means little without an
interval, and two models scored on the *same* prompts and seeds should be compared pairwise
(McNemar / paired bootstrap), which is far more sensitive than comparing two independent CIs.

Everything here is pure numpy/stdlib and seeded, so a results file is reproducible bit for bit.

Choices (documented because papers rarely state them):

- Rates use the Wilson score interval (not the Wald interval, which collapses to [0, 0] at 0/n).
- Means use a percentile bootstrap of the mean; with several images per prompt pass ``groups``
  (the prompt index) so whole prompts are resampled (a cluster bootstrap): images of one prompt
  are not independent draws.
- Binary paired data (flagged / not flagged per image) use McNemar's exact test on the discordant
  pairs; continuous paired data use a paired bootstrap of the per-item differences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = [
    "PairedComparison",
    "bootstrap_ci",
    "compare_paired",
    "mcnemar_exact",
    "paired_bootstrap",
    "wilson_interval",
    "z_for_level",
]


def z_for_level(level: float = 0.95) -> float:
    """Two-sided normal quantile for a confidence level (1.959963984540054 for 0.95)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2.0)


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a rate k/n; stays inside [0, 1] and is sane at k = 0 or k = n."""
    if n <= 0:
        raise ValueError("wilson_interval needs n > 0 (no items were scored)")
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    z = z_for_level(level)
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    # Exact endpoints at the boundaries (floating error would give 1e-17 instead of 0).
    if k == 0:
        low = 0.0
    if k == n:
        high = 1.0
    return low, high


def _resample_means(
    values: np.ndarray, n_boot: int, seed: int, groups: Sequence[Any] | None, chunk: int = 256
) -> np.ndarray:
    """Bootstrap distribution of the mean; resamples whole groups when `groups` is given."""
    rng = np.random.default_rng(seed)
    if groups is None:
        sums, counts = values, np.ones_like(values)
    else:
        if len(groups) != len(values):
            raise ValueError(f"groups has {len(groups)} entries for {len(values)} values")
        _, inv = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
        sums = np.bincount(inv, weights=values)
        counts = np.bincount(inv).astype(float)
    m = len(sums)
    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):  # chunked: n_boot x n indices would not fit for I2P x 3
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, m, size=(b, m))
        out[start : start + b] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    return out


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    groups: Sequence[Any] | None = None,
) -> tuple[float, float]:
    """Seeded percentile-bootstrap CI of the mean (cluster bootstrap over `groups` if given)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("bootstrap_ci needs at least one value (no items were scored)")
    if v.size == 1 or np.all(v == v[0]):
        return float(v.mean()), float(v.mean())
    boots = _resample_means(v, n_boot, seed, groups)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boots, [alpha, 1.0 - alpha])
    return float(low), float(high)


@dataclass
class PairedComparison:
    """Model B minus model A on the same items: effect, its CI, and a two-sided p-value."""

    test: str
    n: int
    mean_a: float
    mean_b: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _binom_cdf_half(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), exact in integers (no scipy needed)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / (1 << n)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, float]:
    """Exact McNemar test; returns (only_a, only_b, two-sided p) from the discordant pairs."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    aa = np.asarray(a, dtype=bool)
    bb = np.asarray(b, dtype=bool)
    only_a = int(np.sum(aa & ~bb))
    only_b = int(np.sum(~aa & bb))
    n = only_a + only_b
    if n == 0:
        return only_a, only_b, 1.0
    p = min(1.0, 2.0 * _binom_cdf_half(min(only_a, only_b), n))
    return only_a, only_b, p


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    groups: Sequence[Any] | None = None,
) -> PairedComparison:
    """Paired bootstrap of mean(b - a); p-value from the null-centred bootstrap distribution."""
    va = np.asarray(a, dtype=np.float64).ravel()
    vb = np.asarray(b, dtype=np.float64).ravel()
    if va.size != vb.size:
        raise ValueError(f"paired samples differ in length: {va.size} vs {vb.size}")
    if va.size == 0:
        raise ValueError("paired_bootstrap needs at least one pair")
    d = vb - va
    diff = float(d.mean())
    if np.all(d == d[0]):
        low = high = diff
        p = 1.0 if diff == 0 else 0.0
    else:
        boots = _resample_means(d, n_boot, seed, groups)
        alpha = (1.0 - level) / 2.0
        low, high = (float(x) for x in np.quantile(boots, [alpha, 1.0 - alpha]))
        extreme = np.sum(np.abs(boots - diff) >= abs(diff))
        p = float((1 + extreme) / (n_boot + 1))
    return PairedComparison(
        test="paired_bootstrap",
        n=int(d.size),
        mean_a=float(va.mean()),
        mean_b=float(vb.mean()),
        diff=diff,
        ci_low=low,
        ci_high=high,
        p_value=min(1.0, p),
        details={"n_boot": n_boot, "level": level, "seed": seed, "clustered": groups is not None},
    )


def compare_paired(
    a: Sequence[float | bool],
    b: Sequence[float | bool],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    groups: Sequence[Any] | None = None,
) -> PairedComparison:
    """Compare two models scored on the same prompts and seeds (item i of `a` pairs with item i of `b`).

    Binary items (flag rates) get McNemar's exact p-value with a paired-bootstrap CI of the rate
    difference; continuous items (scores) get a paired bootstrap for both.
    """
    va = np.asarray(a)
    vb = np.asarray(b)
    binary = all(np.isin(v.astype(np.float64), (0.0, 1.0)).all() for v in (va, vb)) and va.size > 0
    res = paired_bootstrap(
        va.astype(np.float64), vb.astype(np.float64), n_boot=n_boot, level=level, seed=seed, groups=groups
    )
    if binary:
        only_a, only_b, p = mcnemar_exact(va.astype(bool), vb.astype(bool))
        res.test = "mcnemar_exact"
        res.p_value = p
        res.details.update({"only_a": only_a, "only_b": only_b})
    return res
