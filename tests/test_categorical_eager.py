"""logp_categorical's eager paths against the composite form they stand in for.

In plain eager autograd (no torch.func transform, not compiling) float32/float64 logits with
at least 256 classes go through a custom autograd Function with fused kernels, 16 to 255
classes through ``log_softmax`` then ``gather``; everywhere else the composite
``gather - logsumexp`` runs. They must be the same function to every order, in reverse and
forward mode.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import dicefn as dice
from grid import saved_storages

F64 = torch.float64


def composite(logits, actions):
    return logits.gather(-1, actions.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def objective(lp, logits, actions, w):
    """A scalar with non-trivial derivatives of every order in the log-probabilities."""
    logp = lp(logits, actions)
    return (torch.exp(0.3 * logp) * w).sum() + (logp**3 * w).sum()


def derivatives(lp, logits, actions, w):
    """Gradient, one Hessian row and one third-derivative slice, by nested autograd.grad."""
    x = logits.clone().requires_grad_()
    g = torch.autograd.grad(objective(lp, x, actions, w), x, create_graph=True)[0]
    h = torch.autograd.grad(g.flatten()[0], x, create_graph=True)[0]
    t = torch.autograd.grad(h.flatten()[1], x)[0]
    return g.detach(), h.detach(), t


def path(logits, actions):
    """The eager path logp_categorical took, read off the autograd graph."""
    fn = dice.logp_categorical(logits, actions).grad_fn
    seen, stack = set(), [fn]
    while stack:
        f = stack.pop()
        if f is not None and type(f).__name__ not in seen:
            seen.add(type(f).__name__)
            stack.extend(g for g, _ in f.next_functions)
    if any("_CategoricalLogp" in n for n in seen):
        return "fused"
    if "LogSoftmaxBackward0" in seen:
        return "log_softmax"
    assert "LogsumexpBackward0" in seen, seen
    return "composite"


@pytest.mark.parametrize(
    "shape, expected",
    [((5, 300), "fused"), ((2, 3, 256), "fused"), ((5, 16), "log_softmax"),
     ((2, 3, 40), "log_softmax")],
)
def test_eager_path_matches_composite_to_third_order(shape, expected):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=gen, dtype=F64)
    actions = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    w = torch.randn(shape[:-1], generator=gen, dtype=F64)
    assert path(logits.clone().requires_grad_(), actions) == expected
    torch.testing.assert_close(dice.logp_categorical(logits, actions), composite(logits, actions))
    for got, want in zip(
        derivatives(dice.logp_categorical, logits, actions, w),
        derivatives(composite, logits, actions, w),
    ):
        torch.testing.assert_close(got, want)


def test_eager_first_order_backward_matches_composite():
    """Plain ``.backward()`` (no create_graph) takes the in-place branch of the backward."""
    logits = torch.randn(64, 300, dtype=torch.float32)
    actions = torch.randint(0, 300, (64,), dtype=torch.int32)
    w = torch.randn(64)
    grads = []
    for lp in (dice.logp_categorical, composite):
        x = logits.clone().requires_grad_()
        (lp(x, actions.long()) * w).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_eager_forward_mode_and_forward_over_reverse():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 260, generator=gen, dtype=F64)
    tangent = torch.randn(6, 260, generator=gen, dtype=F64)
    actions = torch.randint(0, 260, (6,), generator=gen)
    w = torch.randn(6, generator=gen, dtype=F64)
    out = []
    for lp in (dice.logp_categorical, composite):
        with fwAD.dual_level():
            dual = fwAD.make_dual(logits, tangent)
            jvp = fwAD.unpack_dual(objective(lp, dual, actions, w)).tangent
        with fwAD.dual_level():  # Hessian-vector product: forward over reverse
            dual = fwAD.make_dual(logits.clone().requires_grad_(), tangent)
            g = torch.autograd.grad(objective(lp, dual, actions, w), dual, create_graph=True)[0]
            hvp = fwAD.unpack_dual(g).tangent
        out.append((jvp, hvp))
    torch.testing.assert_close(out[0], out[1])


def test_dispatch():
    actions = torch.zeros(3, dtype=torch.int64)
    assert path(torch.zeros(3, 256, requires_grad=True), actions) == "fused"
    assert path(torch.zeros(3, 255, requires_grad=True), actions) == "log_softmax"
    assert path(torch.zeros(3, 16, requires_grad=True), actions) == "log_softmax"
    assert path(torch.zeros(3, 15, requires_grad=True), actions) == "composite"  # CPU kernels
    seen = []

    def f(x):
        seen.append(path(x, actions))
        return dice.logp_categorical(x, actions).sum()

    torch.func.grad(f)(torch.zeros(3, 300))  # inside a transform: composite
    assert seen == ["composite"]


@pytest.mark.parametrize("classes", [4, 16, 300])
def test_eager_forward_mode_every_path(classes):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(5, classes, generator=gen, dtype=F64)
    tangent = torch.randn(5, classes, generator=gen, dtype=F64)
    actions = torch.randint(0, classes, (5,), generator=gen)
    out = []
    for lp in (dice.logp_categorical, composite):
        with fwAD.dual_level():
            out.append(fwAD.unpack_dual(lp(fwAD.make_dual(logits, tangent), actions)).tangent)
    torch.testing.assert_close(out[0], out[1])


def test_eager_path_compiles_and_saves_what_cross_entropy_saves():
    vocab = 32000
    logits = torch.randn(4, vocab, requires_grad=True)
    actions = torch.randint(0, vocab, (4,))
    def saved(fn):
        return sum(saved_storages(fn))

    ours = saved(lambda: dice.logp_categorical(logits, actions))
    ce = saved(lambda: F.cross_entropy(logits, actions, reduction="none"))
    assert ours <= ce
    compiled = torch.compile(dice.logp_categorical, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logits, actions), composite(logits, actions))
