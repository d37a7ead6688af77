"""How large a difference the seeds can see: minimum detectable effects and seed planning.

A Δ without a Welch mark means "not told apart from seed noise", which is only informative
when the test could have seen an effect of interest. The minimum detectable effect (MDE) of a
comparison is the true difference of means that a two-sided two-sample t-test at level
``alpha`` detects with probability ``power``, given the seed-to-seed spread:

    power(δ) = P(|T| > t_{1-α/2, ν}),  T ~ noncentral t(ν, λ),  λ = δ / (s · √(1/n₁ + 1/n₂)),

with ν = n₁ + n₂ − 2 and ``s`` the pooled within-cell standard deviation of the metric over
every row of the table (each cell's seeds around its own mean; one spread for the table, since
a single cell's 2-3 seeds estimate it poorly). The MDE solves power(δ) = ``power``; it uses
the equal-variance test as the planning approximation of the Welch test the tables run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import optimize, stats

ALPHA = 0.05
POWER = 0.8
MAX_SEEDS = 200


def pooled_sd(samples: Sequence[Sequence[float]]) -> float:
    """Pooled within-sample standard deviation: √(Σ (nᵢ−1) sᵢ² / Σ (nᵢ−1)) over the samples
    with at least two values; NaN when none has two."""
    ss, dof = 0.0, 0
    for sample in samples:
        values = np.asarray(sample, dtype=float)
        values = values[np.isfinite(values)]
        if len(values) >= 2:
            ss += float(((values - values.mean()) ** 2).sum())
            dof += len(values) - 1
    return float(np.sqrt(ss / dof)) if dof else float("nan")


def power_at(effect: float, sd: float, n1: int, n2: int, alpha: float = ALPHA) -> float:
    """Probability that the two-sided t-test detects a true difference ``effect``."""
    df = n1 + n2 - 2
    if df < 1 or not sd > 0:
        return float("nan")
    ncp = abs(effect) / (sd * np.sqrt(1.0 / n1 + 1.0 / n2))
    crit = stats.t.ppf(1 - alpha / 2, df)
    # The lower tail is < 1e-8 for any λ that matters and scipy returns NaN for it at large λ.
    lower = float(np.nan_to_num(stats.nct.cdf(-crit, df, ncp), nan=0.0))
    return float(stats.nct.sf(crit, df, ncp)) + lower


def mde(sd: float, n1: int, n2: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true difference detected with probability ``power`` (NaN without a
    spread or with fewer than 3 seeds in all: the test has no degrees of freedom)."""
    if n1 < 1 or n2 < 1 or n1 + n2 < 3 or not np.isfinite(sd) or not sd > 0:
        return float("nan")
    se = sd * np.sqrt(1.0 / n1 + 1.0 / n2)
    upper = se * 30.0  # λ = 30: power 1 for any ν >= 1 (larger λ overflows nct)
    return float(optimize.brentq(lambda d: power_at(d, sd, n1, n2, alpha) - power,
                                 1e-12 * se, upper, xtol=1e-10 * se))


def seeds_needed(effect: float, sd: float, alpha: float = ALPHA, power: float = POWER,
                 max_seeds: int = MAX_SEEDS) -> int | None:
    """Seeds per cell (equal in both cells) to detect a true difference ``effect``; None if
    more than ``max_seeds`` or no spread is known."""
    if not np.isfinite(sd) or not sd > 0 or effect == 0:
        return None
    for n in range(2, max_seeds + 1):
        if power_at(effect, sd, n, n, alpha) >= power:
            return n
    return None
