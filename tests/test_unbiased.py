"""Monte Carlo derivative estimates against exact derivatives, orders 1 to 3.

Each check draws ``CHUNKS`` independent chunks of ``N`` samples with fixed keys, and requires
every component of the mean estimate to lie within a Bonferroni-corrected z bound (family-wise
false-alarm rate 1e-4) of the exact derivative. The negative controls show the same harness
flags a biased estimator, so a pass means something.
"""

import pytest
import torch

import dicefn as dice
from exact import (
    GRAPHS,
    Chain,
    exact_derivative,
    mc_derivatives,
    z_critical,
    zscores,
)

CHUNKS, N = 64, 256


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("baseline", ["none", "constant", "loo"])
@pytest.mark.parametrize("graph_cls", GRAPHS, ids=lambda g: g.name)
def test_unbiased(graph_cls, baseline, order):
    graph = graph_cls()
    est = mc_derivatives(graph, order, seed=100 + order, chunks=CHUNKS, n=N, baseline=baseline)
    z = zscores(est, exact_derivative(graph, order))
    assert z.abs().max() < z_critical(z.numel()), z


class _MissingAncestor(Chain):
    """Chain whose second cost forgets node a1: biased already at first order."""

    def surrogate(self, theta, key, n, baseline="none", b_const=None):
        l1, a1, l2, a2, pathwise = self.sample(theta, key, n)
        loss = (
            dice.cost_node(self.f[a1], [l1])
            + dice.cost_node(self.g[a1, a2], [l2])
            + dice.cost_node(pathwise, [l1])
        )
        return loss.mean() + torch.sin(self.split(theta)[0]).sum()


class _FirstOrderOnly(Chain):
    """Chain with one magic box per node instead of one per cost: right gradient, wrong Hessian."""

    def surrogate(self, theta, key, n, baseline="none", b_const=None):
        l1, a1, l2, a2, pathwise = self.sample(theta, key, n)
        g = self.g[a1, a2]
        loss = (
            dice.cost_node(self.f[a1], [l1])
            + dice.cost_node(g, [l1])
            + dice.cost_node(g, [l2])
            - g
            + dice.cost_node(pathwise, [l1])
        )
        return loss.mean() + torch.sin(self.split(theta)[0]).sum()


@pytest.mark.parametrize(
    "graph_cls, order", [(_MissingAncestor, 1), (_FirstOrderOnly, 2), (_FirstOrderOnly, 3)]
)
def test_harness_detects_bias(graph_cls, order):
    graph = graph_cls()
    est = mc_derivatives(graph, order, seed=7, chunks=CHUNKS, n=N)
    z = zscores(est, exact_derivative(graph, order))
    assert z.abs().max() > z_critical(z.numel())


def test_first_order_only_estimator_has_right_gradient():
    graph = _FirstOrderOnly()
    est = mc_derivatives(graph, 1, seed=7, chunks=CHUNKS, n=N)
    z = zscores(est, exact_derivative(graph, 1))
    assert z.abs().max() < z_critical(z.numel())


def _total_variance(graph, order, baseline):
    est = mc_derivatives(graph, order, seed=11, chunks=CHUNKS, n=64, baseline=baseline)
    return est.var(0).sum().item()


@pytest.mark.parametrize("order", [2, 3])
def test_any_order_baseline_cuts_higher_order_variance(order):
    """With a large constant offset in the cost, the any-order baseline removes its variance
    from Hessians (and third derivatives); dice-mc's per-node form leaves it in."""
    graph = Chain(offset=100.0)
    none = _total_variance(graph, order, "none")
    any_order = _total_variance(graph, order, "constant")
    loo = _total_variance(graph, order, "loo")
    dice_mc = _total_variance(graph, order, "dice_mc")
    assert none / any_order > 100
    assert none / loo > 100
    assert none / dice_mc < 5
    assert dice_mc / any_order > 100


def test_baselines_agree_on_gradient_variance():
    """At first order the two forms are the same estimator."""
    graph = Chain(offset=100.0)
    any_order = mc_derivatives(graph, 1, seed=3, chunks=8, n=64, baseline="constant")
    dice_mc = mc_derivatives(graph, 1, seed=3, chunks=8, n=64, baseline="dice_mc")
    torch.testing.assert_close(any_order, dice_mc)
