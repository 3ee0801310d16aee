"""Stochastic nodes: log-probabilities against torch.distributions, samplers against their
distributions, memory saved for backward, dtypes, and bad input."""

import math

import pytest
import torch
import torch.distributions as D
import torch.nn.functional as F

import dicefn as dice
from grid import saved_storages
from stats import KS_CRITICAL_SQRT_N, chi2_critical, ks_statistic

FLOATS = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", FLOATS)
def test_logp_categorical_matches_distribution(dtype):
    logits = torch.randn(2, 5, 7, dtype=dtype)
    actions = torch.randint(0, 7, (2, 5))
    out = dice.logp_categorical(logits, actions)
    assert out.dtype == dtype and out.shape == (2, 5)
    torch.testing.assert_close(out, D.Categorical(logits=logits).log_prob(actions))


@pytest.mark.parametrize("dtype", FLOATS)
def test_logp_bernoulli_matches_distribution(dtype):
    logits = torch.randn(4, 3, dtype=dtype) * 3
    value = torch.randint(0, 2, (4, 3))
    ref = D.Bernoulli(logits=logits).log_prob(value.to(dtype))
    for v in (value, value.bool(), value.to(dtype)):
        out = dice.logp_bernoulli(logits, v)
        assert out.dtype == dtype
        torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("dtype", FLOATS)
def test_logp_normal_matches_distribution(dtype):
    loc, scale = torch.randn(4, 3, dtype=dtype), torch.rand(3, dtype=dtype) + 0.5
    value = torch.randn(4, 3, dtype=dtype)
    out = dice.logp_normal(loc, scale, value)
    torch.testing.assert_close(out, D.Normal(loc, scale).log_prob(value))


def test_logp_normal_is_score_function_node():
    loc = torch.zeros(3, requires_grad=True)
    value = (loc + 1.0)  # a value that would carry a pathwise gradient if not detached
    (g,) = torch.autograd.grad(dice.logp_normal(loc, torch.ones(3), value).sum(), loc)
    torch.testing.assert_close(g, torch.ones(3))  # score: (value - loc) / scale**2


def test_generic_logp():
    dist = D.Poisson(torch.tensor([2.0, 3.0]))
    value = torch.tensor([1.0, 4.0], requires_grad=True)
    out = dice.logp(dist, value)
    torch.testing.assert_close(out, dist.log_prob(value.detach()))
    assert not out.requires_grad
    with pytest.raises(TypeError, match="Distribution"):
        dice.logp(torch.zeros(2), value)
    with pytest.raises(TypeError, match="torch.Tensor"):
        dice.logp(dist, [1.0])


def _chi2_categorical(actions, probs):
    counts = torch.bincount(actions.reshape(-1), minlength=probs.numel()).double()
    expected = probs.double() * actions.numel()
    return ((counts - expected) ** 2 / expected).sum().item()


@pytest.mark.parametrize("with_key", [True, False])
def test_sample_categorical_frequencies(with_key):
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log().expand(1 << 16, -1)
    key = dice.random.key(0) if with_key else None
    logp, actions = dice.sample_categorical(logits, key=key)
    assert actions.dtype == torch.int64 and actions.shape == (1 << 16,)
    torch.testing.assert_close(logp.exp(), probs[actions])
    assert _chi2_categorical(actions, probs) < chi2_critical(3)


@pytest.mark.parametrize("with_key", [True, False])
def test_sample_bernoulli_frequencies(with_key):
    p = torch.tensor([0.05, 0.5, 0.9], dtype=torch.float64)
    n = 1 << 15
    key = dice.random.key(1) if with_key else None
    logp, value = dice.sample_bernoulli(torch.logit(p).expand(n, -1), key=key)
    assert value.dtype == torch.float64 and set(value.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(logp, D.Bernoulli(probs=p).log_prob(value))
    z = (value.mean(0) - p) / torch.sqrt(p * (1 - p) / n)
    assert z.abs().max() < 5


@pytest.mark.parametrize("with_key", [True, False])
def test_sample_normal_distribution(with_key):
    loc = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([0.5, 3.0], dtype=torch.float64)
    n = 1 << 15
    key = dice.random.key(2) if with_key else None
    logp, x = dice.sample_normal(loc.expand(n, -1), scale, key=key)
    assert not x.requires_grad and x.shape == (n, 2)
    torch.testing.assert_close(logp, D.Normal(loc, scale).log_prob(x))
    for j in range(2):
        d = ks_statistic((x[:, j] - loc[j].detach()) / scale[j], lambda v: 0.5 * (1 + torch.erf(v / math.sqrt(2))))
        assert math.sqrt(n) * d < KS_CRITICAL_SQRT_N


def test_samplers_are_deterministic_given_key():
    k = dice.random.key(5)
    logits = torch.randn(10, 6)
    assert torch.equal(dice.sample_categorical(logits, key=k)[1], dice.sample_categorical(logits, key=k)[1])
    assert torch.equal(dice.sample_bernoulli(logits, key=k)[1], dice.sample_bernoulli(logits, key=k)[1])
    assert torch.equal(
        dice.sample_normal(logits, torch.ones(6), key=k)[1],
        dice.sample_normal(logits, torch.ones(6), key=k)[1],
    )


# Half precision and memory ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits(dtype):
    logits32 = torch.randn(6, 50) * 4
    logits = logits32.to(dtype).requires_grad_()
    actions = torch.randint(0, 50, (6,))
    out = dice.logp_categorical(logits, actions)
    assert out.dtype == torch.float32
    ref = torch.log_softmax(logits.detach().float(), -1).gather(-1, actions[:, None])[:, 0]
    torch.testing.assert_close(out, ref)  # scored in float32: exact up to float32 rounding
    (g,) = torch.autograd.grad(out.sum(), logits, retain_graph=True)
    assert g.dtype == dtype
    lf = logits.detach().float().requires_grad_()
    (ref_g,) = torch.autograd.grad((torch.log_softmax(lf, -1).gather(-1, actions[:, None])).sum(), lf)
    torch.testing.assert_close(g.float(), ref_g, atol=1e-2, rtol=1e-2)
    # second derivatives (reverse over reverse) are available
    (g2,) = torch.autograd.grad(
        torch.autograd.grad(out.sum(), logits, create_graph=True)[0].float().pow(2).sum(), logits
    )
    assert torch.isfinite(g2.float()).all()
    logp, a = dice.sample_categorical(logits, key=dice.random.key(0))
    assert logp.dtype == torch.float32 and a.shape == (6,)
    assert dice.logp_bernoulli(logits, a[:, None] > 0).dtype == torch.float32


def test_half_precision_forward_mode_raises_instead_of_lying():
    logits = torch.randn(3, 4, dtype=torch.bfloat16)
    actions = torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="jvp"):
        torch.func.jacfwd(lambda x: dice.logp_categorical(x, actions).sum())(logits)


def _saved_bytes(fn):
    sizes = saved_storages(fn)
    return sum(sizes), sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logp_categorical_saves_one_vocabulary_tensor(dtype):
    vocab = 32000
    logits = torch.randn(4, vocab, dtype=dtype, requires_grad=True)
    actions = torch.randint(0, vocab, (4,))
    one = logits.numel() * logits.element_size()
    total, sizes = _saved_bytes(lambda: dice.logp_categorical(logits, actions))
    assert sum(s >= one for s in sizes) == 1  # the logits themselves, nothing vocabulary-sized
    ce, _ = _saved_bytes(lambda: F.cross_entropy(logits, actions, reduction="none"))
    lsm, _ = _saved_bytes(lambda: torch.log_softmax(logits.float(), -1).gather(-1, actions[:, None]))
    # At most one float32 per row (the logsumexp) beyond cross_entropy's saved bytes.
    assert total <= ce + 4 * actions.numel()
    if dtype == torch.bfloat16:  # float32 scoring without a float32 copy saved
        assert total < lsm / 1.9


# Bad input -----------------------------------------------------------------------------------------


def test_categorical_bad_input():
    logits = torch.randn(4, 3)
    with pytest.raises(TypeError, match="actions must be an integer tensor.*torch.float32"):
        dice.logp_categorical(logits, torch.zeros(4))
    with pytest.raises(TypeError, match="actions must be an integer tensor.*torch.bool"):
        dice.logp_categorical(logits, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"actions must have shape.*\(4,\), got \(4, 1\)"):
        dice.logp_categorical(logits, torch.zeros(4, 1, dtype=torch.int64))
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        dice.logp_categorical(torch.zeros(4, 3, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="class dimension"):
        dice.sample_categorical(torch.tensor(1.0))


def test_bernoulli_and_normal_bad_input():
    with pytest.raises(ValueError, match=r"logp_bernoulli: shapes do not broadcast: logits \(4,\), value \(3,\)"):
        dice.logp_bernoulli(torch.zeros(4), torch.zeros(3))
    with pytest.raises(ValueError, match=r"sample_normal: shapes do not broadcast: loc \(4,\), scale \(3,\)"):
        dice.sample_normal(torch.zeros(4), torch.ones(3), key=dice.random.key(0))
    with pytest.raises(TypeError, match="value must be a floating-point"):
        dice.logp_normal(torch.zeros(3), torch.ones(3), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="scale must be a torch.Tensor"):
        dice.sample_normal(torch.zeros(3), 1.0)
