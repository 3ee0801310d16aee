"""cost_node / baseline_term / batch_baseline_term: shapes, values, first derivatives, errors."""

from collections import namedtuple

import pytest
import torch

import dicefn as dice


def _ref_surrogate(cost, taus):
    tau = sum(taus)
    return torch.exp(tau - tau.detach()) * cost


def test_forward_value_is_cost():
    logp = torch.randn(4, 3, requires_grad=True)
    cost = torch.randn(4)
    out = dice.cost_node(cost, [logp])
    assert torch.equal(out, cost)
    assert torch.equal(dice.baseline_term(cost, [logp]), torch.zeros(4))


def test_gradient_is_score_function():
    logits = torch.randn(5, 3, requires_grad=True)
    actions = torch.tensor([0, 2, 1, 1, 0])
    cost = torch.randn(5)
    logp = dice.logp_categorical(logits, actions)
    (g,) = torch.autograd.grad(dice.cost_node(cost, [logp]).sum(), logits)
    ref_logp = torch.log_softmax(logits, -1).gather(-1, actions[:, None])[:, 0]
    (ref,) = torch.autograd.grad((ref_logp * cost).sum(), logits)
    torch.testing.assert_close(g, ref)


def test_left_broadcasting_rules():
    x = torch.randn(3, 4, 5, requires_grad=True)
    # trailing dims summed
    torch.testing.assert_close(
        dice.cost_node(torch.ones(3, 4), x).sum(), _ref_surrogate(torch.ones(3, 4), [x.sum(-1)]).sum()
    )

    def tau_of(cost_shape, node):
        (g,) = torch.autograd.grad(dice.cost_node(torch.ones(cost_shape), node).sum(), x)
        return g

    # trailing dims summed: each cost entry's gradient is the sum of its own node entries.
    torch.testing.assert_close(tau_of((3, 4), x), torch.ones(3, 4, 5))
    torch.testing.assert_close(tau_of((3,), x), torch.ones(3, 4, 5))
    # a size-1 dim of the cost sums over the node's dim: cost [3, 1] sees all 4 x 5 entries.
    torch.testing.assert_close(tau_of((3, 1), x), torch.ones(3, 4, 5))
    # a scalar cost sees every entry
    torch.testing.assert_close(tau_of((), x), torch.ones(3, 4, 5))
    # values: cost [3, 1] surrogate has derivative sum over dims 1, 2
    c = torch.randn(3, 1)
    out = dice.cost_node(c, x)
    assert out.shape == (3, 1)
    (g,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(g, c[:, :, None].expand(3, 4, 5))


def test_node_broadcast_over_cost():
    """A node with fewer dims, or size-1 dims, applies to every matching cost entry."""
    w = torch.randn(3, requires_grad=True)
    cost = torch.randn(3, 4)
    out = dice.cost_node(cost, w)
    assert out.shape == (3, 4)
    (g,) = torch.autograd.grad(out.sum(), w)
    torch.testing.assert_close(g, cost.sum(1))
    s = torch.randn((), requires_grad=True)
    (g,) = torch.autograd.grad(dice.cost_node(cost, s).sum(), s)
    torch.testing.assert_close(g, cost.sum())
    v = torch.randn(1, 4, requires_grad=True)
    (g,) = torch.autograd.grad(dice.cost_node(cost, v).sum(), v)
    torch.testing.assert_close(g, cost.sum(0, keepdim=True))


def test_pytree_nodes():
    a = torch.randn(4, requires_grad=True)
    b = torch.randn(4, 2, requires_grad=True)
    c = torch.randn(4, requires_grad=True)
    Pair = namedtuple("Pair", "x y")
    cost = torch.randn(4)
    trees = [
        [a, b, c],
        (a, [b, {"c": c}]),
        {"a": a, "rest": Pair(b, c), "none": None},
    ]
    ref = dice.cost_node(cost, [a, b.sum(-1), c])
    ga = torch.autograd.grad(ref.sum(), [a, b, c])
    for tree in trees:
        out = dice.cost_node(cost, tree)
        torch.testing.assert_close(out, cost)
        for x, y in zip(torch.autograd.grad(out.sum(), [a, b, c]), ga):
            torch.testing.assert_close(x, y)


def test_no_nodes():
    cost = torch.randn(3)
    assert dice.cost_node(cost, []) is cost
    assert torch.equal(dice.baseline_term(cost, {}), torch.zeros(3))


def test_baseline_term_is_subtraction_at_every_order():
    """cost_node(c, W) + baseline_term(b, W) has the derivatives of box(W) * (c - b)."""
    th = torch.randn(3, dtype=torch.float64)
    c, b = torch.tensor(2.5, dtype=torch.float64), torch.tensor(1.75, dtype=torch.float64)

    def f(t):
        w = [t[0] * t[1], torch.sin(t[2]) + t[0] ** 2]
        return dice.cost_node(c, w) + dice.baseline_term(b, w)

    def ref(t):
        w = t[0] * t[1] + torch.sin(t[2]) + t[0] ** 2
        return dice.magic_box(w) * (c - b)

    d_f, d_ref = f, ref
    for _ in range(3):
        d_f, d_ref = torch.func.jacrev(d_f), torch.func.jacrev(d_ref)
        torch.testing.assert_close(d_f(th), d_ref(th))


def test_batch_baseline_is_leave_one_out():
    logp = torch.randn(4, 3, requires_grad=True)
    cost = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    term = dice.batch_baseline_term(cost, logp[:, :, None], dim=0)
    assert torch.equal(term, torch.zeros(4, 3))
    (g,) = torch.autograd.grad(term.sum(), logp)
    loo = (cost.sum(0, keepdim=True) - cost) / 3
    torch.testing.assert_close(g, -loo)
    # dim=1: groups of samples per prompt
    term1 = dice.batch_baseline_term(cost, logp[:, :, None], dim=1)
    (g1,) = torch.autograd.grad(term1.sum(), logp)
    torch.testing.assert_close(g1, -(cost.sum(1, keepdim=True) - cost) / 2)
    # negative dims are accepted
    (g2,) = torch.autograd.grad(dice.batch_baseline_term(cost, logp[:, :, None], dim=-1).sum(), logp)
    torch.testing.assert_close(g2, g1)


def test_batch_baseline_is_detached():
    cost = torch.randn(5, requires_grad=True)
    logp = torch.randn(5, requires_grad=True)
    (g,) = torch.autograd.grad(dice.batch_baseline_term(cost, logp).sum(), cost, allow_unused=True)
    assert g is None or torch.equal(g, torch.zeros(5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_preserved(dtype):
    cost = torch.randn(3, dtype=dtype)
    logp = torch.randn(3, 2, dtype=dtype)
    assert dice.cost_node(cost, logp).dtype == dtype
    assert dice.baseline_term(cost, logp).dtype == dtype
    assert dice.batch_baseline_term(cost, logp).dtype == dtype


# Bad input -------------------------------------------------------------------------------


def test_misaligned_node_names_shapes():
    with pytest.raises(ValueError, match=r"node 1 of shape \(5,\).*\(4,\).*dim 0 \(5 vs 4\)"):
        dice.cost_node(torch.ones(4), [torch.zeros(4), torch.zeros(5, 2)])
    with pytest.raises(ValueError, match=r"baseline_term: node 0"):
        dice.baseline_term(torch.ones(4, 3), torch.zeros(4, 2))


def test_non_tensor_nodes():
    with pytest.raises(TypeError, match="node 1 is a float"):
        dice.cost_node(torch.ones(3), [torch.zeros(3), 0.5])
    with pytest.raises(TypeError, match="node 0 is a ndarray|node 0 is a list"):
        dice.cost_node(torch.ones(3), {"a": __import__("numpy").zeros(3)})


def test_integer_nodes_rejected():
    with pytest.raises(TypeError, match="node 0 has dtype torch.int64"):
        dice.cost_node(torch.ones(3), torch.tensor([0, 1, 2]))


def test_bad_cost():
    with pytest.raises(TypeError, match="cost must be a floating-point tensor"):
        dice.cost_node(torch.tensor([1, 2]), [torch.zeros(2)])
    with pytest.raises(TypeError, match="torch.Tensor"):
        dice.cost_node([1.0, 2.0], [torch.zeros(2)])


def test_batch_baseline_errors():
    with pytest.raises(ValueError, match=r"at least 2 samples along dim 0.*\(1, 3\)"):
        dice.batch_baseline_term(torch.ones(1, 3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"at least 2 samples along dim 1.*\(4, 1\)"):
        dice.batch_baseline_term(torch.ones(4, 1), torch.zeros(4, 1), dim=1)
    with pytest.raises(ValueError, match="scalar"):
        dice.batch_baseline_term(torch.tensor(1.0), torch.zeros(()))
    with pytest.raises(ValueError, match=r"dim 2 is out of range.*\(4, 3\)"):
        dice.batch_baseline_term(torch.ones(4, 3), torch.zeros(4, 3), dim=2)
