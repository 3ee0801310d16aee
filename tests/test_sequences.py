"""Sequences: discounted cumulative sums, Loaded DiCE, returns and GAE.

Truth: Python loops for the scans; exact enumeration of a tiny autoregressive policy
(vocabulary 3, length 3: 27 sequences) for unbiasedness at orders 1 to 3; the Loaded DiCE
authors' random tabular MDP, whose value and derivatives are exact, for the published
correlations and the bias/variance trade-off of ``lam``.
"""

import math

import pytest
import torch
from torch.func import grad, hessian, jacfwd, vmap

import dicefn as dice
from dicefn._src import mdp as M
from exact import F64, derivative, z_critical, zscores
from grid import THETA, TRANSFORMS, assert_compiles_like_eager, saved_storages

# Plain-loop references ---------------------------------------------------------------------


def loop_cumsum(x, lam):
    """``w_t = lam * w_{t-1} + x_t`` along the last dim, by a loop."""
    w, out = torch.zeros_like(x[..., 0]), []
    for t in range(x.shape[-1]):
        w = lam * w + x[..., t]
        out.append(w)
    return torch.stack(out, -1)


def loop_gae(r, v, gamma, lam, mask=None, done=None):
    """GAE by the textbook backward loop, with padding and episode ends."""
    steps = r.shape[-1]
    m = torch.ones_like(r, dtype=torch.bool) if mask is None else mask
    dn = torch.zeros_like(r, dtype=torch.bool) if done is None else done
    a, out = torch.zeros_like(r[..., 0]), [None] * steps
    for t in reversed(range(steps)):
        nxt = m[..., t + 1] if t + 1 < steps else torch.ones_like(m[..., t])
        cont = (m[..., t] & nxt & ~dn[..., t]).to(r.dtype)
        delta = r[..., t] + gamma * v[..., t + 1] * cont - v[..., t]
        a = torch.where(m[..., t], delta + gamma * lam * cont * a, torch.zeros_like(a))
        out[t] = a
    return torch.stack(out, -1)


def box(x):
    return torch.exp(x - x.detach())


# discounted_cumsum -------------------------------------------------------------------------

LAMS = [0.0, 1e-3, 0.3, 0.9, 0.999, 1.0]


@pytest.mark.parametrize("length", [1, 7, 64, 65, 200, 4096])
def test_discounted_cumsum_matches_loop(length):
    x = torch.randn(3, length, dtype=F64)
    for lam in LAMS:
        torch.testing.assert_close(dice.discounted_cumsum(x, lam), loop_cumsum(x, lam), rtol=1e-12, atol=1e-12)


def test_discounted_cumsum_dims_and_empty():
    x = torch.randn(70, 2, 3, dtype=F64)
    ref = loop_cumsum(x.movedim(0, -1), 0.7).movedim(-1, 0)
    torch.testing.assert_close(dice.discounted_cumsum(x, 0.7, dim=0), ref)
    torch.testing.assert_close(dice.discounted_cumsum(x, 0.7, dim=-3), ref)
    y = x.movedim(0, 1)
    torch.testing.assert_close(dice.discounted_cumsum(y, 0.7, dim=1), ref.movedim(0, 1))
    empty = torch.zeros(2, 0)
    assert dice.discounted_cumsum(empty, 0.5).shape == (2, 0)


def test_discounted_cumsum_is_finite_where_negative_powers_overflow():
    """``lam**-t`` overflows float64 beyond t ~ 1000 at lam=0.5; the blocked scan never forms it."""
    x = torch.randn(2, 4096)
    for lam in (0.01, 0.5, 0.99):
        out = dice.discounted_cumsum(x, lam)
        assert torch.isfinite(out).all()
        ref = loop_cumsum(x.double(), float(torch.tensor(lam, dtype=torch.float32)))
        # float32 against float64 truth: rounding of a sum of ~1/(1-lam) terms
        tol = 1e-5 * ref.abs().max().item() / (1 - lam)
        assert (out.double() - ref).abs().max() < tol


def test_discounted_cumsum_saves_nothing_input_sized_for_backward():
    x = torch.randn(16, 4096, requires_grad=True)
    for lam in (0.0, 0.5, 1.0):
        sizes = saved_storages(lambda: dice.discounted_cumsum(x, lam))
        # only the [64, 64] block matrices (and lam's powers): nothing of the size of x
        assert all(b <= 64 * 64 * 4 for b in sizes), sizes
        out = dice.discounted_cumsum(x, lam)
        (g,) = torch.autograd.grad(out.sum(), x)
        # d/dx_j sum_t w_t = sum_{t>=j} lam**(t-j)
        torch.testing.assert_close(g[0], loop_cumsum(torch.ones(4096, dtype=F64), lam).flip(-1).float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_discounted_cumsum_half_precision_scans_in_float32(dtype):
    x = torch.randn(2, 300).to(dtype)
    out = dice.discounted_cumsum(x, 0.95)
    assert out.dtype == dtype
    torch.testing.assert_close(out, dice.discounted_cumsum(x.float(), 0.95).to(dtype), atol=0, rtol=0)


def test_discounted_cumsum_tensor_lam():
    x = torch.randn(3, 150, dtype=F64)
    lam = torch.tensor(0.8, dtype=F64)
    torch.testing.assert_close(dice.discounted_cumsum(x, lam), loop_cumsum(x, 0.8))
    # vmap over a sweep of lam values, and the derivative with respect to lam
    lams = torch.tensor([0.0, 0.5, 0.8, 1.0], dtype=F64)
    swept = vmap(lambda l: dice.discounted_cumsum(x, l))(lams)
    for i, v in enumerate(lams.tolist()):
        torch.testing.assert_close(swept[i], loop_cumsum(x, v))
    g = grad(lambda l: dice.discounted_cumsum(x, l).sum())(lam)
    g_ref = grad(lambda l: loop_cumsum(x, l).sum())(lam)
    torch.testing.assert_close(g, g_ref)


def test_discounted_cumsum_bad_input():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\], got 1.5"):
        dice.discounted_cumsum(x, 1.5)
    with pytest.raises(ValueError, match="lam must lie"):
        dice.discounted_cumsum(x, -0.1)
    with pytest.raises(TypeError, match="got bool"):
        dice.discounted_cumsum(x, True)
    with pytest.raises(TypeError, match="lam must be a float"):
        dice.discounted_cumsum(x, "0.5")
    with pytest.raises(ValueError, match="0-dim floating tensor"):
        dice.discounted_cumsum(x, torch.tensor([0.5]))
    with pytest.raises(ValueError, match=r"dim 2 is out of range for shape \(3, 4\)"):
        dice.discounted_cumsum(x, 0.5, dim=2)
    with pytest.raises(TypeError, match="floating-point"):
        dice.discounted_cumsum(torch.ones(3, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="scalar"):
        dice.discounted_cumsum(torch.tensor(1.0), 0.5)


# loaded_dice --------------------------------------------------------------------------------


def _policy_logp(theta, actions):
    """A little policy over 4 steps, 3 actions: logits depend on theta and the step."""
    steps = torch.arange(actions.shape[-1], dtype=theta.dtype)
    logits = theta[:3] + steps[:, None] * theta[3:6] * 0.3  # [T, 3]
    return dice.logp_categorical(logits.expand(actions.shape[0], -1, -1), actions)


ACTIONS = torch.tensor([[0, 2, 1, 1], [2, 2, 0, 1], [1, 0, 0, 2]])
COSTS = torch.tensor([[1.0, -0.5, 2.0, 0.3], [0.2, 0.0, -1.0, 1.5], [0.7, 0.4, 0.1, -0.2]], dtype=F64)


def test_loaded_dice_lam1_with_cost_to_go_equals_prefix_dice_per_sample():
    """sum_t term_t + A_0 is the prefix-sum DiCE surrogate as a function: same derivatives."""
    def loaded(theta):
        logp = _policy_logp(theta, ACTIONS)
        g = dice.returns(COSTS * theta[0], 1.0)  # cost-to-go, with a pathwise dependence
        return (dice.loaded_dice(logp, g, 1.0).sum(-1) + g[:, 0]).sum()

    def prefix(theta):
        logp = _policy_logp(theta, ACTIONS)
        return dice.cost_node(COSTS * theta[0], dice.discounted_cumsum(logp, 1.0)).sum()

    assert dice.loaded_dice(_policy_logp(THETA, ACTIONS), COSTS).abs().max() == 0
    torch.testing.assert_close(loaded(THETA), prefix(THETA))
    torch.testing.assert_close(grad(loaded)(THETA), grad(prefix)(THETA))
    torch.testing.assert_close(hessian(loaded)(THETA), hessian(prefix)(THETA))
    torch.testing.assert_close(jacfwd(hessian(loaded))(THETA), jacfwd(hessian(prefix))(THETA))


def test_loaded_dice_lam0_has_no_cross_step_terms():
    """lam=0: each step's term is (box(logp_t) - 1) A_t, a first-order estimator per step."""
    adv = COSTS

    def loaded(theta):
        return dice.loaded_dice(_policy_logp(theta, ACTIONS), adv, 0.0).sum()

    def per_step(theta):
        return ((box(_policy_logp(theta, ACTIONS)) - 1) * adv).sum()

    torch.testing.assert_close(hessian(loaded)(THETA), hessian(per_step)(THETA))
    # and it differs from lam=1, whose Hessian has the cross-step products
    full = hessian(lambda t: dice.loaded_dice(_policy_logp(t, ACTIONS), adv, 1.0).sum())(THETA)
    assert (full - hessian(loaded)(THETA)).abs().max() > 1e-3


def test_loaded_dice_broadcast_and_errors():
    logp = torch.randn(2, 5)
    out = dice.loaded_dice(logp, torch.ones(5), 0.5)
    assert out.shape == (2, 5) and out.abs().max() == 0
    with pytest.raises(ValueError, match=r"loaded_dice: shapes do not broadcast: logp \(2, 5\), advantages \(4,\)"):
        dice.loaded_dice(logp, torch.ones(4))
    with pytest.raises(TypeError, match="advantages must be a floating-point"):
        dice.loaded_dice(logp, torch.ones(5, dtype=torch.int64))


# gae and returns ----------------------------------------------------------------------------


@pytest.mark.parametrize("flags", ["none", "mask", "done", "both"])
def test_gae_and_returns_match_loops(flags):
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(5, 37, generator=gen, dtype=F64)
    v = torch.randn(5, 38, generator=gen, dtype=F64)
    kw = {}
    if flags in ("mask", "both"):
        kw["mask"] = torch.rand(5, 37, generator=gen) < 0.8
    if flags in ("done", "both"):
        kw["done"] = torch.rand(5, 37, generator=gen) < 0.2
    for lam in (0.0, 0.7, 1.0):
        torch.testing.assert_close(dice.gae(r, v, 0.9, lam, **kw), loop_gae(r, v, 0.9, lam, **kw))
    torch.testing.assert_close(dice.returns(r, 0.9, **kw), loop_gae(r, torch.zeros_like(v), 0.9, 1.0, **kw))
    # time along another dim
    kw_t = {k: f.t() for k, f in kw.items()}
    torch.testing.assert_close(dice.gae(r.t(), v.t(), 0.9, 0.7, dim=0, **kw_t), loop_gae(r, v, 0.9, 0.7, **kw).t())


def test_gae_conventions():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=F64)
    v = torch.tensor([[0.5, -1.0, 2.0, 0.0, 7.0]], dtype=F64)
    # lam=1: bootstrapped discounted return minus V; lam=0: the one-step TD error
    g = dice.returns(r, 0.9) + 0.9 ** torch.arange(4, 0, -1, dtype=F64) * 7.0
    torch.testing.assert_close(dice.gae(r, v, 0.9, 1.0), g - v[:, :-1])
    torch.testing.assert_close(dice.gae(r, v, 0.9, 0.0), r + 0.9 * v[:, 1:] - v[:, :-1])
    # linear: costs and cost values give minus the reward advantages
    torch.testing.assert_close(dice.gae(-r, -v, 0.9, 0.5), -dice.gae(r, v, 0.9, 0.5))
    # a padded tail ends the episode: no bootstrap from values after it
    mask = torch.tensor([[True, True, False, False]])
    out = dice.gae(r, v, 0.9, 1.0, mask=mask)
    torch.testing.assert_close(out, torch.tensor([[1.0 + 0.9 * 2.0 - 0.5, 2.0 + 1.0, 0.0, 0.0]], dtype=F64))


def test_gae_bad_input():
    r, v = torch.zeros(2, 4), torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"expected \(2, 5\), got \(2, 4\)"):
        dice.gae(r, r, 0.9, 0.9)
    with pytest.raises(ValueError, match="gamma must lie"):
        dice.gae(r, v, 1.1, 0.9)
    with pytest.raises(TypeError, match="lam must be a float"):
        dice.gae(r, v, 0.9, torch.tensor(0.9))
    with pytest.raises(TypeError, match="mask must be a bool"):
        dice.gae(r, v, 0.9, 0.9, mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"done must have the shape of rewards \(2, 4\), got \(4,\)"):
        dice.returns(r, 0.9, done=torch.zeros(4, dtype=torch.bool))


# Transforms ---------------------------------------------------------------------------------

MASK = torch.tensor([[True, True, True, False], [True, True, False, False], [True, True, True, True]])
DONE = torch.tensor([[False, True, False, False], [False, False, False, False], [False, False, True, False]])


def _x(theta):  # [6] -> [3, 4]
    return torch.stack([theta[:4], theta[2:] * theta[0], theta[:4].sin()])


def _v(theta):  # [6] -> [3, 5]
    return torch.cat([_x(theta).cos(), theta[3:].reshape(3, 1)], -1)


CASES = {
    "discounted_cumsum": (
        lambda t: (dice.discounted_cumsum(_x(t), 0.6) ** 2).sum(),
        lambda t: (loop_cumsum(_x(t), 0.6) ** 2).sum(),
    ),
    "discounted_cumsum_long": (
        lambda t: (dice.discounted_cumsum(_x(t).repeat(1, 40), 0.9) ** 2).sum(),
        lambda t: (loop_cumsum(_x(t).repeat(1, 40), 0.9) ** 2).sum(),
    ),
    "discounted_cumsum_tensor_lam": (
        lambda t: (dice.discounted_cumsum(_x(t), torch.sigmoid(t[1])) ** 2).sum(),
        lambda t: (loop_cumsum(_x(t), torch.sigmoid(t[1])) ** 2).sum(),
    ),
    "loaded_dice": (
        lambda t: dice.loaded_dice(_policy_logp(t, ACTIONS), COSTS * t[2], 0.5).sum(),
        lambda t: (
            (box(loop_cumsum(_policy_logp(t, ACTIONS), 0.5))
             - box(loop_cumsum(_policy_logp(t, ACTIONS), 0.5) - _policy_logp(t, ACTIONS)))
            * COSTS * t[2]
        ).sum(),
    ),
    "gae": (
        lambda t: (dice.gae(_x(t), _v(t), 0.9, 0.8) ** 2).sum(),
        lambda t: (loop_gae(_x(t), _v(t), 0.9, 0.8) ** 2).sum(),
    ),
    "gae_masked": (
        lambda t: (dice.gae(_x(t), _v(t), 0.9, 0.8, mask=MASK, done=DONE) ** 2).sum(),
        lambda t: (loop_gae(_x(t), _v(t), 0.9, 0.8, MASK, DONE) ** 2).sum(),
    ),
    "returns": (
        lambda t: (dice.returns(_x(t), 0.7, done=DONE) ** 2).sum(),
        lambda t: (loop_gae(_x(t), torch.zeros(3, 5, dtype=t.dtype), 0.7, 1.0, None, DONE) ** 2).sum(),
    ),
}

@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("case", CASES)
def test_transform_matches_loop_reference(case, transform):
    f, ref = CASES[case]
    torch.testing.assert_close(TRANSFORMS[transform](f), TRANSFORMS[transform](ref))


@pytest.mark.parametrize("case", CASES)
def test_compile_fullgraph(case):
    assert_compiles_like_eager(CASES[case][0])


# Exact enumeration: a tiny autoregressive policy ------------------------------------------------

VOCAB, LENGTH, BOS = 3, 3, 3
BETA = 0.5  # weight of the per-token KL cost


class TinyLM:
    """A 1-unit recurrent policy over 3 tokens, 3 steps: 27 sequences, 11 parameters.

    ``h_t = tanh(w h_{t-1} + e[x_t])``, ``logits_t = u h_t + b``, ``x_0 = BOS``. Costs: a
    per-token cost ``tok[t, a_t] + pair[a_{t-1}, a_t]``, a terminal cost ``term[a]``, and
    ``BETA`` times the exact per-token KL to a fixed reference policy (a pathwise cost).

    Surrogate variants:
      prefix: per-token costs on the inclusive prefix, the KL on the exclusive prefix.
      prefix_inclusive_kl: the KL on the inclusive prefix too.
      loaded: ``loaded_dice(lam=1)`` with cost-to-go minus a baseline of the previous
        token, plus the KL cost nodes.
      loaded_pathwise: ``loaded_dice(lam=1)`` on the undetached cost-to-go of every cost
        (KL included) plus ``A_0``.
      rloo: :func:`dicefn.lm.rloo_surrogate` in groups of 4 (the sum of per-token costs is
        treated as a sequence cost).
      loaded_lam_half / bad_baseline: negative controls (biased at order 2 / order 1).
    """

    name = "tiny_lm"

    def __init__(self):
        gen = torch.Generator().manual_seed(3)
        self.theta = torch.randn(11, generator=gen, dtype=F64) * 0.8
        self.theta_ref = torch.randn(11, generator=gen, dtype=F64) * 0.8
        self.tok = torch.randn(LENGTH, VOCAB, generator=gen, dtype=F64)
        self.pair = torch.randn(VOCAB + 1, VOCAB, generator=gen, dtype=F64)
        self.term = torch.randn(VOCAB, VOCAB, VOCAB, generator=gen, dtype=F64) * 2
        self.base = torch.randn(LENGTH, VOCAB + 1, generator=gen, dtype=F64)

    @staticmethod
    def logits(theta, inputs):
        """Teacher-forced logits ``[n, len(inputs), V]`` for input tokens ``[n, k]``."""
        e, w, u, b = theta[:4], theta[4], theta[5:8], theta[8:11]
        h = torch.zeros(inputs.shape[0], dtype=theta.dtype)
        out = []
        for t in range(inputs.shape[1]):
            h = torch.tanh(w * h + e[inputs[:, t]])
            out.append(h[:, None] * u + b)
        return torch.stack(out, 1)

    def costs(self, ids):
        """Per-token costs aligned with ``ids`` [n, 4] (0 at position 0), terminal cost."""
        a = ids[:, 1:]
        c = self.tok[torch.arange(LENGTH), a] + self.pair[ids[:, :-1], a]
        return torch.nn.functional.pad(c, (1, 0)), self.term[a[:, 0], a[:, 1], a[:, 2]]

    def exact(self, theta):
        grid = torch.cartesian_prod(*[torch.arange(VOCAB)] * LENGTH)  # [27, 3]
        ids = torch.cat([torch.full((27, 1), BOS), grid], 1)
        lp = torch.log_softmax(self.logits(theta, ids[:, :-1]), -1)
        lq = torch.log_softmax(self.logits(self.theta_ref, ids[:, :-1]), -1)
        p_seq = lp.gather(-1, grid[..., None])[..., 0].sum(-1).exp()
        kl = (lp.exp() * (lp - lq)).sum(-1).sum(-1)  # the KL at t depends on tokens < t
        c, term = self.costs(ids)
        return (p_seq * (c.sum(-1) + term + BETA * kl)).sum()

    def sample(self, key, n):
        """``n`` sequences ``[BOS, a_0, a_1, a_2]`` drawn token by token (generation)."""
        keys = dice.random.split(key, LENGTH)
        ids = torch.full((n, 1), BOS)
        for t in range(LENGTH):
            logits_t = self.logits(self.theta, ids)[:, -1]
            _, a = dice.sample_categorical(logits_t, key=keys[t])
            ids = torch.cat([ids, a[:, None]], 1)
        return ids

    def surrogate(self, theta, ids, variant):
        """The DiCE loss of sampled ``ids`` [n, 4] as a function of ``theta``."""
        n = ids.shape[0]
        mask = torch.arange(LENGTH + 1) >= 1
        mask = mask.expand(n, -1)
        logits = self.logits(theta, ids[:, :-1])  # [n, L - 1, V]: score the samples
        logp = dice.lm.completion_logp(logits, ids, mask)
        kl = dice.lm.kl_cost(logits, self.logits(self.theta_ref, ids[:, :-1]), mask)
        c, term = self.costs(ids)
        prefix = dice.discounted_cumsum(logp, 1.0)
        kl_node = dice.cost_node(kl, prefix - logp).sum(-1)
        if variant == "prefix":
            loss = dice.cost_node(c, prefix).sum(-1) + dice.cost_node(term, logp) + BETA * kl_node
        elif variant == "prefix_inclusive_kl":
            loss = dice.cost_node(c + BETA * kl, prefix).sum(-1) + dice.cost_node(term, logp)
        elif variant in ("loaded", "loaded_lam_half", "bad_baseline"):
            cost = c + torch.nn.functional.pad(term[:, None], (LENGTH, 0))
            prev = ids[:, :-1] if variant != "bad_baseline" else ids[:, 1:]
            b = torch.nn.functional.pad(self.base[torch.arange(LENGTH), prev], (1, 0))
            lam = 0.5 if variant == "loaded_lam_half" else 1.0
            loss = dice.loaded_dice(logp, dice.returns(cost, 1.0) - b, lam).sum(-1) + BETA * kl_node
        elif variant == "loaded_pathwise":
            cost = c + BETA * kl + torch.nn.functional.pad(term[:, None], (LENGTH, 0))
            g = dice.returns(cost, 1.0)
            loss = dice.loaded_dice(logp, g, 1.0).sum(-1) + g[:, 0]
        elif variant == "rloo":
            loss = dice.lm.rloo_surrogate(logp, c.sum(-1) + term, group_size=4, kl=kl, kl_coef=BETA)
        else:
            raise ValueError(variant)
        return loss.mean()


CHUNKS, N = 64, 256


# Third derivatives are checked in a random 4-dimensional subspace of the 11 parameters
# (all 64 components of D^3 f(theta + B alpha) at alpha = 0): any bias of the full tensor
# shows in a random subspace, at an eighth of the cost.
SUBSPACE = torch.linalg.qr(torch.randn(11, 4, generator=torch.Generator().manual_seed(8), dtype=F64))[0]


def _tiny_lm_z(variant, order, seed):
    """z-scores of ``CHUNKS`` chunks of ``N`` sampled sequences against the exact derivative.

    Sampling (with keys) is separated from the differentiated surrogate, as a generate-then-
    score pipeline does.
    """
    graph = TinyLM()
    keys = dice.random.split(dice.random.key(seed), CHUNKS)
    ids = torch.stack([graph.sample(k, N) for k in keys])
    if order < 3:
        point, lift = graph.theta, lambda t: t
    else:
        point, lift = torch.zeros(SUBSPACE.shape[1], dtype=F64), lambda a: graph.theta + SUBSPACE @ a
    d = derivative(lambda a, x: graph.surrogate(lift(a), x, variant), order)
    est = vmap(d, in_dims=(None, 0))(point, ids).reshape(CHUNKS, -1)
    exact = derivative(lambda a: graph.exact(lift(a)), order)(point).reshape(-1)
    return zscores(est, exact)


@pytest.mark.parametrize(
    "variant, order",
    [(v, k) for v in ("prefix", "loaded", "rloo") for k in (1, 2, 3)]
    + [("loaded_pathwise", 1), ("loaded_pathwise", 2)],
)
def test_tiny_lm_unbiased(variant, order):
    z = _tiny_lm_z(variant, order, seed=40 + order)
    assert z.abs().max() < z_critical(z.numel()), z.abs().max()


def test_tiny_lm_inclusive_kl_prefix_is_unbiased_too():
    z = _tiny_lm_z("prefix_inclusive_kl", 2, seed=50)
    assert z.abs().max() < z_critical(z.numel())


@pytest.mark.parametrize("variant, order", [("loaded_lam_half", 2), ("bad_baseline", 1)])
def test_tiny_lm_harness_detects_bias(variant, order):
    z = _tiny_lm_z(variant, order, seed=60)
    assert z.abs().max() > z_critical(z.numel())


# The Loaded DiCE authors' MDP -------------------------------------------------------------------

# Mean correlation with the exact derivatives (orders 1, 2, 3) over 5 seeds, from the authors'
# demo results (../shared/reference/papers.md section 3).
PUBLISHED = {
    ("loaded", 64): (0.98, 0.64, -0.03),
    ("loaded", 256): (1.00, 0.87, 0.50),
    ("any_order_baseline", 64): (0.89, 0.26, 0.07),
    ("any_order_baseline", 256): (0.96, 0.57, 0.30),
    ("lvc", 64): (0.92, 0.83, 0.07),
    ("lvc", 256): (0.97, 0.87, 0.01),
}
ESTIMATORS = {"loaded": (1.0, 0.0), "any_order_baseline": (1.0, 1.0), "lvc": (0.0, 0.0)}
SEEDS = 24


def _corr(a, b):
    return torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1]


def _mdp_estimates(estimator_args, batch_size, seeds, seed0, orders=3):
    """Element derivatives (orders 1..3) on ``seeds`` independent batches: [seeds, 3, 20].

    ``estimator_args`` is ``(lam, tau)`` for Loaded DiCE, or ``None`` for plain DiCE."""
    mdp, theta = M.authors_mdp()
    values = M.state_values(mdp, theta).detach()

    def estimate(key):
        traj = M.rollout(mdp, theta, key, batch_size, 50)
        if estimator_args is None:
            f = lambda t: M.dice_objective(mdp, t, traj, values)  # noqa: E731
        else:
            f = lambda t: M.loaded_dice_objective(mdp, t, traj, values, *estimator_args)  # noqa: E731
        return torch.stack(M.element_derivatives(f, theta, orders)).reshape(orders, -1)

    keys = dice.random.split(dice.random.key(seed0), seeds)
    return torch.stack([estimate(k) for k in keys])


@pytest.fixture(scope="module")
def authors_exact():
    mdp, theta = M.authors_mdp()
    return torch.stack(M.element_derivatives(lambda t: M.exact_value(mdp, t), theta, 3)).reshape(3, -1)


@pytest.mark.parametrize("batch_size", [64, 256])
@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_mdp_correlations_match_published(authors_exact, estimator, batch_size):
    """On the authors' MDP instance, the mean correlation over SEEDS batches is at least the
    published 5-seed mean, up to the published mean's own sampling error: the one-sided z of
    the difference, with both standard errors estimated from our per-seed spread, is > -2.

    (LVC, lam=0, is biased at orders 2 and 3: its correlation there is a property of the
    instance, reproduced here because it is the same instance.)"""
    est = _mdp_estimates(ESTIMATORS[estimator], batch_size, SEEDS, seed0=batch_size)
    corr = torch.stack([torch.stack([_corr(e[k], authors_exact[k]) for k in range(3)]) for e in est])
    mean, sd = corr.mean(0), corr.std(0)
    published = torch.tensor(PUBLISHED[(estimator, batch_size)], dtype=mean.dtype)
    # the published figures are rounded to 2 decimals: allow the rounding half-width
    z = (mean - (published - 0.005)) / torch.sqrt(sd**2 / SEEDS + sd**2 / 5).clamp(min=1e-4)
    assert (z > -2).all(), (mean, published, z)


def test_mdp_rollouts_match_exact_values():
    """Bellman: the 50-step value bootstrapped with exact state values is the exact value;
    the mean sampled return matches it (z-test on 4096 episodes)."""
    mdp, theta = M.authors_mdp()
    values = M.state_values(mdp, theta)
    torch.testing.assert_close(M.truncated_value(mdp, theta, 50, values), M.exact_value(mdp, theta))
    traj = M.rollout(mdp, theta, dice.random.key(11), 4096, 50)
    disc = mdp.gamma ** torch.arange(50, dtype=F64)
    ret = (traj.rewards * disc).sum(-1) + mdp.gamma**50 * values[traj.states[:, -1]]
    z = (ret.mean() - M.exact_value(mdp, theta)) / (ret.std() / math.sqrt(4096))
    assert abs(z) < 4
    assert traj.states.shape == (4096, 51) and traj.actions.shape == (4096, 50)
    # the rollout is a pure function of the key
    assert torch.equal(M.rollout(mdp, theta, dice.random.key(11), 8, 5).states, M.rollout(mdp, theta, dice.random.key(11), 8, 5).states)


def test_mdp_loaded_dice_unbiased_for_the_truncated_objective():
    """lam=1 (GAE tau 0 and 1) and plain DiCE estimate the exact derivatives of the 50-step
    objective with its bootstrap values held fixed, at orders 1 to 3; lam=0 is biased at
    order 2."""
    mdp, theta = M.authors_mdp()
    values = M.state_values(mdp, theta).detach()
    exact = torch.stack(
        M.element_derivatives(lambda t: M.truncated_value(mdp, t, 50, values), theta, 3)
    ).reshape(3, -1)
    crit = z_critical(3 * exact.shape[1])
    for args, seed in (((1.0, 0.0), 1), ((1.0, 1.0), 2), (None, 4)):
        est = _mdp_estimates(args, 64, 64, seed0=seed)
        z = torch.stack([zscores(est[:, k], exact[k]) for k in range(3)])
        assert z.abs().max() < crit, (args, z.abs().amax(1))
    est = _mdp_estimates((0.0, 0.0), 64, 64, seed0=3, orders=2)
    assert zscores(est[:, 1], exact[1]).abs().max() > z_critical(exact.shape[1])


def test_mdp_lower_lam_lowers_higher_order_variance():
    lams = [0.0, 0.5, 1.0]
    variance = torch.stack(
        [_mdp_estimates((lam, 0.0), 64, 16, seed0=7).var(0).sum(-1) for lam in lams]
    )  # [lams, orders]: total variance over the 20 components, 16 batches of 64 episodes
    for order in (1, 2):  # second and third order
        v = variance[:, order]
        assert (v[1:] > 1.5 * v[:-1]).all(), v
        assert v[-1] > 20 * v[0], v
    assert math.isclose(variance[0, 0], variance[-1, 0], rel_tol=1e-9)  # first order: same
