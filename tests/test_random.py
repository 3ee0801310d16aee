"""dicefn.random: known-answer vectors, determinism, independence and distribution tests.

All statistical tests use fixed keys (deterministic) and bounds at false-alarm rates of
1e-3 or less.
"""

import math

import pytest
import torch
from torch.func import vmap

import dicefn as dice
from dicefn import random as jr
from stats import KS_CRITICAL_SQRT_N, chi2_critical, ks_statistic

M = 0xFFFFFFFF


@pytest.mark.parametrize(
    "key, counter, expected",
    [
        # Random123 known-answer vectors for threefry2x32_20 (also JAX's test vectors).
        ((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
        ((M, M), (M, M), (0x1CB996FC, 0xBB002BE7)),
        ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
    ],
)
def test_threefry_known_answers(key, counter, expected):
    t = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    y0, y1 = jr.threefry2x32(t(key[0]), t(key[1]), t(counter[0]), t(counter[1]))
    assert (y0.item(), y1.item()) == expected


def test_key_layout():
    assert jr.key(42).tolist() == [0, 42]
    assert jr.key((7 << 32) | 5).tolist() == [7, 5]
    assert jr.key(-1).tolist() == [M, M]
    assert torch.equal(jr.key(torch.tensor(12345)), jr.key(12345))
    assert jr.key(0).dtype == torch.int64


def test_same_key_same_draws():
    k = jr.key(3)
    for fn in (jr.uniform, jr.normal, jr.gumbel, jr.bits):
        assert torch.equal(fn(k, (5, 7)), fn(k, (5, 7)))
    assert torch.equal(jr.split(k, 4), jr.split(k, 4))
    assert torch.equal(jr.fold_in(k, 9), jr.fold_in(k, 9))


def test_keys_differ():
    k = jr.key(0)
    made = [jr.key(1), *jr.split(k, 4), jr.fold_in(k, 0), jr.fold_in(k, 1), k]
    assert len({tuple(x.tolist()) for x in made}) == len(made)
    # split/fold_in/draws use separate counter domains: no key equals the key's first bits.
    first_words = jr.bits(k, (8,)).tolist()
    assert not any(w in first_words for x in made for w in x.tolist())


def test_bits_frequency():
    """Each of the 32 bit positions is set half the time (z < 5 over 2**18 words)."""
    w = jr.bits(jr.key(1), (1 << 18,))
    assert w.min() >= 0 and w.max() <= M
    bitfreq = torch.stack([((w >> b) & 1).double().mean() for b in range(32)])
    z = (bitfreq - 0.5) / math.sqrt(0.25 / w.numel())
    assert z.abs().max() < 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_frequency_and_range(dtype):
    u = jr.uniform(jr.key(2), (1 << 20,), dtype=dtype)
    assert u.dtype == dtype
    assert u.min() > 0 and u.max() < 1
    counts = torch.histc(u.double(), bins=256, min=0, max=1)
    expected = u.numel() / 256
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < chi2_critical(255)


def test_uniform_float64_has_52_bits():
    u = jr.uniform(jr.key(2), (4096,), dtype=torch.float64)
    frac = u * 2.0**23 - torch.floor(u * 2.0**23)
    assert frac.std() > 0.2  # float32-resolution draws would all sit at the same offset


def test_uniform_interval():
    u = jr.uniform(jr.key(4), (10000,), dtype=torch.float64, minval=-3.0, maxval=5.0)
    assert u.min() > -3 and u.max() < 5
    assert abs(u.mean().item() - 1.0) < 5 * 8 / math.sqrt(12 * 10000)


def test_pairs_independent():
    """Chi-square on 16x16 bins of consecutive uniforms (serial independence)."""
    u = jr.uniform(jr.key(5), (1 << 20,), dtype=torch.float64)
    cells = (u[0::2] * 16).long() * 16 + (u[1::2] * 16).long()
    counts = torch.bincount(cells, minlength=256).double()
    expected = cells.numel() / 256
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < chi2_critical(255)


def test_split_streams_independent():
    """Streams from split keys (and from vmap over them) are uncorrelated."""
    keys = jr.split(jr.key(6), 16)
    n = 1 << 14
    u = vmap(lambda k: jr.uniform(k, (n,), dtype=torch.float64))(keys)
    for i, k in enumerate(keys):
        assert torch.equal(u[i], jr.uniform(k, (n,), dtype=torch.float64))
    c = torch.corrcoef(u)
    off = c[~torch.eye(16, dtype=torch.bool)]
    # 240 correlations, each ~ N(0, 1/n): bound at 5 standard deviations.
    assert off.abs().max() < 5 / math.sqrt(n)


def test_fold_in_streams_independent():
    k = jr.key(7)
    n = 1 << 14
    u = torch.stack([jr.uniform(jr.fold_in(k, i), (n,), dtype=torch.float64) for i in range(8)])
    c = torch.corrcoef(u)
    assert c[~torch.eye(8, dtype=torch.bool)].abs().max() < 5 / math.sqrt(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_distribution(dtype):
    z = jr.normal(jr.key(8), (1 << 16,), dtype=dtype)
    assert z.dtype == dtype
    n = z.numel()
    d = ks_statistic(z, lambda x: 0.5 * (1 + torch.erf(x / math.sqrt(2))))
    assert math.sqrt(n) * d < KS_CRITICAL_SQRT_N
    z = z.double()
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)


def test_normal_odd_size_and_scalar():
    assert jr.normal(jr.key(0), (3, 5)).shape == (3, 5)
    assert jr.normal(jr.key(0)).shape == ()


def test_gumbel_distribution():
    g = jr.gumbel(jr.key(9), (1 << 16,), dtype=torch.float64)
    n = g.numel()
    d = ks_statistic(g, lambda x: torch.exp(-torch.exp(-x)))
    assert math.sqrt(n) * d < KS_CRITICAL_SQRT_N
    euler_gamma = 0.5772156649015329
    assert abs(g.mean() - euler_gamma) < 5 * math.sqrt(math.pi**2 / 6 / n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_draws(dtype):
    for fn in (jr.uniform, jr.normal, jr.gumbel):
        x = fn(jr.key(1), (64,), dtype=dtype)
        assert x.dtype == dtype and torch.isfinite(x).all()


def test_default_dtype_is_respected():
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert jr.uniform(jr.key(0), (2,)).dtype == torch.float64
    finally:
        torch.set_default_dtype(prev)


def test_vmap_over_seeds_makes_keys():
    seeds = torch.arange(5)
    keys = vmap(jr.key)(seeds)
    assert torch.equal(keys, torch.stack([jr.key(i) for i in range(5)]))


def test_fold_in_tensor_data_under_vmap():
    k = jr.key(0)
    out = vmap(lambda d: jr.fold_in(k, d))(torch.arange(4))
    assert torch.equal(out, torch.stack([jr.fold_in(k, i) for i in range(4)]))


def test_compiled_draws_match_eager():
    def draw(k):
        k1, k2 = jr.split(k)
        return jr.uniform(k1, (33,)), jr.normal(jr.fold_in(k2, 3), (7,)), jr.gumbel(k2, (4, 4))

    compiled = torch.compile(draw, fullgraph=True, backend="aot_eager")
    for a, b in zip(draw(jr.key(1)), compiled(jr.key(1))):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (torch.tensor(3), ValueError, r"shape \(2,\), got \(\)"),
        (torch.zeros(3, dtype=torch.int64), ValueError, r"shape \(2,\), got \(3,\)"),
        (torch.zeros(4, 2, dtype=torch.int64), ValueError, "vmap"),
        (torch.zeros(2), TypeError, "torch.int64"),
        (torch.zeros(2, dtype=torch.int32), TypeError, "torch.int64"),
        ([0, 1], TypeError, "key tensor"),
        (7, TypeError, "key tensor"),
    ],
)
def test_invalid_keys(bad, error, match):
    with pytest.raises(error, match=match):
        jr.uniform(bad, (3,))
    with pytest.raises(error, match=match):
        dice.sample_categorical(torch.zeros(3), key=bad)


def test_invalid_arguments():
    k = jr.key(0)
    with pytest.raises(ValueError, match="positive"):
        jr.split(k, 0)
    with pytest.raises(ValueError, match="2\\*\\*32"):
        jr.fold_in(k, -1)
    with pytest.raises(ValueError, match="2\\*\\*64"):
        jr.key(1 << 64)
    with pytest.raises(TypeError, match="integer tensor"):
        jr.key(torch.tensor(1.5))
    with pytest.raises(TypeError, match="int"):
        jr.key(1.5)
    with pytest.raises(ValueError, match="non-negative"):
        jr.uniform(k, (2, -1))
    with pytest.raises(TypeError, match="floating-point"):
        jr.uniform(k, (2,), dtype=torch.int32)
    with pytest.raises(ValueError, match="scalar"):
        jr.key(torch.arange(3))
