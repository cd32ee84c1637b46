"""Intervals and paired tests: known published values, edge cases, determinism."""

import math

import numpy as np
import pytest

from conceptlock.stats import (
    bootstrap_ci,
    compare_paired,
    mcnemar_exact,
    paired_bootstrap,
    wilson_interval,
    z_for_level,
)


@pytest.mark.parametrize(
    "k,n,low,high",
    [  # Newcombe (1998), Stat. Med. 17:857, Table I, method 3 (Wilson score)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
        (5, 10, 0.2366, 0.7634),
    ],
)
def test_wilson_known_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=5e-5)
    assert hi == pytest.approx(high, abs=5e-5)


def test_wilson_edges_and_errors():
    assert wilson_interval(0, 7)[0] == 0.0
    assert wilson_interval(7, 7)[1] == 1.0
    assert z_for_level(0.95) == pytest.approx(1.959964, abs=1e-6)
    lo99, hi99 = wilson_interval(5, 10, level=0.99)
    lo95, hi95 = wilson_interval(5, 10)
    assert lo99 < lo95 and hi99 > hi95
    with pytest.raises(ValueError):
        wilson_interval(0, 0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_bootstrap_seeded_and_contains_mean():
    rng = np.random.default_rng(3)
    v = rng.normal(5.0, 1.0, size=200)
    a = bootstrap_ci(v, seed=7)
    assert a == bootstrap_ci(v, seed=7)  # seeded: bit-for-bit
    assert a != bootstrap_ci(v, seed=8)
    assert a[0] < v.mean() < a[1]
    se = v.std(ddof=1) / math.sqrt(len(v))  # percentile CI ~ mean +- 1.96 se
    assert a[1] - a[0] == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert bootstrap_ci([3.0, 3.0, 3.0]) == (3.0, 3.0)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_cluster_bootstrap_is_wider_for_correlated_items():
    rng = np.random.default_rng(0)
    prompt_effect = rng.normal(0, 1, size=50)
    v = np.repeat(prompt_effect, 4) + rng.normal(0, 0.1, size=200)  # 4 near-identical images per prompt
    groups = np.repeat(np.arange(50), 4)
    naive = bootstrap_ci(v)
    clustered = bootstrap_ci(v, groups=groups)
    assert (clustered[1] - clustered[0]) > 1.5 * (naive[1] - naive[0])


def test_mcnemar_exact():
    # 4 discordant pairs all one way: p = 2 * 0.5**4 = 0.125
    assert mcnemar_exact([1, 1, 1, 1, 0, 1], [0, 0, 0, 0, 0, 1]) == (4, 0, 0.125)
    assert mcnemar_exact([1, 0], [1, 0])[2] == 1.0
    # 10 vs 2 discordant: 2 * P(X <= 2 | n=12) = 2 * 79 / 4096
    _, _, p = mcnemar_exact([1] * 10 + [0] * 2, [0] * 10 + [1] * 2)
    assert p == pytest.approx(2 * 79 / 4096)
    with pytest.raises(ValueError):
        mcnemar_exact([1], [1, 0])


def test_compare_paired_binary_and_continuous():
    a = [1] * 30 + [0] * 70
    b = [0] * 25 + [1] * 5 + [0] * 70
    r = compare_paired(a, b)
    assert r.test == "mcnemar_exact" and r.details["only_a"] == 25 and r.details["only_b"] == 0
    assert r.diff == pytest.approx(-0.25) and r.ci_high < 0 and r.p_value < 1e-6
    rng = np.random.default_rng(1)
    x = rng.normal(size=100)
    same = paired_bootstrap(x, x + rng.normal(0, 0.01, 100))
    assert same.p_value > 0.01
    shifted = compare_paired(x, x + 1.0 + rng.normal(0, 0.1, 100))
    assert shifted.test == "paired_bootstrap" and shifted.ci_low > 0.9 and shifted.p_value < 0.01
