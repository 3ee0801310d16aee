"""Small stochastic computation graphs with exact expectations, and a z-score harness.

Each graph has parameters ``theta`` (a flat float64 vector), an ``exact(theta)`` expectation
computed by enumeration (or in closed form for Gaussians), and a ``surrogate(theta, key,
baseline)`` DiCE objective that samples ``n`` independent examples *inside* the function with
an explicit key, so ``torch.func`` can differentiate it to any order.

``mc_derivatives`` evaluates the surrogate's derivative of a given order on ``chunks``
independent keys (vmapped); ``zscores`` compares their mean with the exact derivative using
the standard error across chunks.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch
from torch.func import hessian, jacfwd, jacrev, vmap

import dicefn as dice

F64 = torch.float64


def derivative(f, order):
    """The ``order``-th derivative of scalar ``f(theta, *args)`` with respect to theta."""
    if order == 1:
        return jacrev(f)
    if order == 2:
        return hessian(f)
    if order == 3:
        return jacfwd(hessian(f))
    raise ValueError(order)


def baseline_terms(kind, cost, nodes, b_const):
    """The baseline term of estimator ``kind`` for per-sample costs ``[n]``.

    ``kind`` is a name, or a ``dice.Baseline`` whose state is passed in as ``b_const``.
    """
    if isinstance(kind, dice.Baseline):
        return kind.update(b_const, cost, nodes)[0]
    if kind == "none":
        return torch.zeros_like(cost)
    if kind == "constant":
        return dice.baseline_term(b_const.expand_as(cost), nodes)
    if kind == "loo":
        return dice.batch_baseline_term(cost, nodes)
    if kind == "dice_mc":  # dice-mc 0.1.1's per-node form, first order only
        return sum(dice.baseline_term(b_const.expand_as(cost), w) for w in nodes)
    raise ValueError(kind)


class Categorical:
    """a ~ Cat(softmax(theta)), cost C[a] + offset."""

    name = "categorical"

    def __init__(self, offset=0.0):
        self.theta = torch.tensor([0.3, -0.5, 0.1, 0.8], dtype=F64)
        self.table = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=F64) + offset

    def exact(self, theta):
        return (torch.softmax(theta, -1) * self.table).sum()

    def surrogate(self, theta, key, n, baseline="none", b_const=None):
        logp, a = dice.sample_categorical(theta.expand(n, -1), key=key)
        cost = self.table[a]
        return (dice.cost_node(cost, [logp]) + baseline_terms(baseline, cost, [logp], b_const)).mean()


class Chain:
    """a1 ~ Cat(theta1), a2 ~ Cat(theta2[a1]).

    Costs: f[a1] (nodes a1), g[a1, a2] + offset (nodes a1, a2), a pathwise cost
    0.5 * theta2[a1, 0]**2 * h[a1] (nodes a1), and a deterministic sum(sin(theta1)).
    """

    name = "chain"

    def __init__(self, offset=0.0):
        g = torch.Generator().manual_seed(0)
        self.theta = torch.randn(3 + 3 * 2, generator=g, dtype=F64) * 0.5
        self.f = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
        self.g = torch.randn(3, 2, generator=g, dtype=F64) * 2 + offset
        self.h = torch.tensor([1.0, -0.5, 2.0], dtype=F64)

    @staticmethod
    def split(theta):
        return theta[:3], theta[3:].reshape(3, 2)

    def exact(self, theta):
        t1, t2 = self.split(theta)
        p1, p2 = torch.softmax(t1, -1), torch.softmax(t2, -1)
        inner = self.f + (p2 * self.g).sum(-1) + 0.5 * t2[:, 0] ** 2 * self.h
        return (p1 * inner).sum() + torch.sin(t1).sum()

    def sample(self, theta, key, n):
        """Draws ``n`` chains: ``(l1, a1, l2, a2, pathwise_cost)``."""
        t1, t2 = self.split(theta)
        k1, k2 = dice.random.split(key)
        l1, a1 = dice.sample_categorical(t1.expand(n, -1), key=k1)
        l2, a2 = dice.sample_categorical(t2[a1], key=k2)
        return l1, a1, l2, a2, 0.5 * t2[a1, 0] ** 2 * self.h[a1]

    def surrogate(self, theta, key, n, baseline="none", b_const=None):
        l1, a1, l2, a2, pathwise = self.sample(theta, key, n)
        loss = (
            dice.cost_node(self.f[a1], [l1])
            + dice.cost_node(self.g[a1, a2], {"first": l1, "second": (l2,)})
            + dice.cost_node(pathwise, [l1])
        )
        if baseline != "none":
            total = self.f[a1] + self.g[a1, a2] + pathwise
            loss = loss + baseline_terms(baseline, total, [l1, l2], b_const)
        return loss.mean() + torch.sin(self.split(theta)[0]).sum()


class Bernoulli:
    """Three independent Bernoulli(sigmoid(theta_i)) bits, cost table[b] + offset."""

    name = "bernoulli"

    def __init__(self, offset=0.0):
        g = torch.Generator().manual_seed(1)
        self.theta = torch.tensor([0.2, -0.7, 1.1], dtype=F64)
        self.table = torch.randn(2, 2, 2, generator=g, dtype=F64) * 2 + offset

    def exact(self, theta):
        p = torch.sigmoid(theta)
        q = torch.stack([1 - p, p], -1)  # [3, 2]
        return torch.einsum("i,j,k,ijk->", q[0], q[1], q[2], self.table)

    def surrogate(self, theta, key, n, baseline="none", b_const=None):
        logp, b = dice.sample_bernoulli(theta.expand(n, -1), key=key)
        bi = b.long()
        cost = self.table[bi[:, 0], bi[:, 1], bi[:, 2]]
        return (dice.cost_node(cost, logp) + baseline_terms(baseline, cost, [logp], b_const)).mean()


class Normal:
    """x ~ N(mu, exp(log_sigma)) in 2-D; cost x1^3 - 2 x1 x2 + 0.5 mu1 x2 + x2^2 + offset."""

    name = "normal"

    def __init__(self, offset=0.0):
        self.theta = torch.tensor([0.4, -0.3, -0.6, -0.2], dtype=F64)
        self.offset = offset

    def exact(self, theta):
        m1, m2 = theta[0], theta[1]
        s1, s2 = torch.exp(theta[2]), torch.exp(theta[3])
        return m1**3 + 3 * m1 * s1**2 - 2 * m1 * m2 + 0.5 * m1 * m2 + m2**2 + s2**2 + self.offset

    def surrogate(self, theta, key, n, baseline="none", b_const=None):
        loc, scale = theta[:2].expand(n, -1), torch.exp(theta[2:]).expand(n, -1)
        logp, x = dice.sample_normal(loc, scale, key=key)
        x1, x2 = x[:, 0], x[:, 1]
        cost = x1**3 - 2 * x1 * x2 + 0.5 * theta[0] * x2 + x2**2 + self.offset
        return (dice.cost_node(cost, logp) + baseline_terms(baseline, cost, [logp], b_const)).mean()


GRAPHS = [Categorical, Chain, Bernoulli, Normal]


def mc_derivatives(graph, order, *, seed, chunks, n, baseline="none", state=None):
    """Derivative estimates of ``order`` on ``chunks`` independent keys: ``[chunks, P**order]``.

    ``state``: for a ``dice.Baseline``, the state every chunk starts from (fixed, not updated).
    """
    b_const = graph.exact(graph.theta).detach() if state is None else state
    keys = dice.random.split(dice.random.key(seed), chunks)

    def f(theta, key):
        return graph.surrogate(theta, key, n, baseline, b_const)

    d = vmap(derivative(f, order), in_dims=(None, 0))(graph.theta, keys)
    return d.reshape(chunks, -1)


def exact_derivative(graph, order):
    return derivative(graph.exact, order)(graph.theta).reshape(-1)


def zscores(estimates, exact):
    """z-score of each component's mean against the exact value, from the chunk spread.

    Components whose chunk estimates are all equal (zero variance) must match exactly; they
    are returned as 0 when they do and +inf when they do not.
    """
    chunks = estimates.shape[0]
    mean = estimates.mean(0)
    se = estimates.std(0) / math.sqrt(chunks)
    scale = exact.abs().clamp(min=1.0)
    degenerate = se <= 1e-12 * scale
    err = mean - exact
    z = err / torch.where(degenerate, torch.ones_like(se), se)
    exact_ok = err.abs() <= 1e-9 * scale
    return torch.where(degenerate, torch.where(exact_ok, 0.0, math.inf), z)


def z_critical(num_components, alpha=1e-4):
    """Two-sided Bonferroni critical value for ``num_components`` simultaneous z-tests."""
    return NormalDist().inv_cdf(1 - alpha / (2 * num_components))
