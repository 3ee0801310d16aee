"""Critical values for the statistical tests (no SciPy needed)."""

import math
from statistics import NormalDist


def chi2_critical(dof, p=1e-6):
    """Upper ``p`` quantile of chi-square(dof) by the Wilson-Hilferty approximation."""
    z = NormalDist().inv_cdf(1 - p)
    a = 2.0 / (9.0 * dof)
    return dof * (1 - a + z * math.sqrt(a)) ** 3


def ks_statistic(samples, cdf):
    """Kolmogorov-Smirnov distance between the samples' empirical cdf and ``cdf``."""
    x = samples.double().sort().values
    n = x.numel()
    f = cdf(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - f).max().item(), (f - (i - 1) / n).max().item())


KS_CRITICAL_SQRT_N = 1.95  # sqrt(n) * D exceeds this with probability ~1e-3

import torch  # noqa: E402  (used by ks_statistic)
