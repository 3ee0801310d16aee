"""Counter-based pseudo-random numbers from explicit keys (Threefry-2x32-20).

A key is an ``int64`` tensor of shape ``(2,)`` holding two 32-bit words. Every draw is
``threefry2x32(key, counter)`` over a block of counters, computed with integer tensor ops
only (add, shift, or, and, xor on ``int64`` values that never exceed 62 bits, so there is no
overflow anywhere and every backend gives the same bits). Draws are therefore pure functions
of the key: they run under ``torch.func.vmap`` (a stack of keys ``[N, 2]`` gives ``N``
independent draws), inside ``grad``/``jacrev``/``jacfwd``/``hessian``, and under
``torch.compile``.

The high counter word separates domains so that ``split``, ``fold_in`` and draws from one key
never share a counter: 0 for draws, 1 for ``split``, 2 for ``fold_in``.

Cost: one Threefry block (20 rounds, 5 key injections, about 140 elementwise ``int64`` ops)
yields two 32-bit words. A float32 draw uses one word, a float64 draw two words.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from dicefn._src import checks

_MASK = 0xFFFFFFFF
_PARITY = 0x1BD11BDA
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_DRAW, _SPLIT, _FOLD = 0, 1, 2
_MAX_WORDS = 1 << 32

Shape = Union[int, Sequence[int], torch.Size]


def threefry2x32(
    k0: torch.Tensor, k1: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011) on ``int64`` tensors of 32-bit words.

    ``x1`` is kept below ``2**32`` (its rotation needs the exact word); ``x0`` is masked
    only at the end: only its low 32 bits ever matter (sums and xors carry upwards only) and
    20 additions of 32-bit words keep it below ``2**38``. Every intermediate stays below
    ``2**61``. Six in-place ops per round.

    Args:
      k0, k1: the key words, broadcastable to the counters; values in ``[0, 2**32)``.
      x0, x1: the counter words; values in ``[0, 2**32)``.

    Returns:
      The two output words, ``int64`` tensors with values in ``[0, 2**32)``.
    """
    k2 = k0 ^ k1 ^ _PARITY
    ks = (k0, k1, k2)
    x0 = x0 + k0
    x1 = (x1 + k1) & _MASK
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 += x1
            rot = x1 >> (32 - r)
            x1 <<= r
            x1 |= rot
            x1 ^= x0
            x1 &= _MASK
        x0 += ks[(i + 1) % 3]
        x1 += ks[(i + 2) % 3] + (i + 1)
        x1 &= _MASK
    return x0 & _MASK, x1


def check_key(key: object, what: str = "key") -> torch.Tensor:
    """Raises unless ``key`` is a single key: an ``int64`` tensor of shape ``(2,)``."""
    if not isinstance(key, torch.Tensor):
        raise TypeError(
            f"{what} must be a key tensor from dicefn.random.key(seed), got "
            f"{type(key).__name__}."
        )
    if key.dtype != torch.int64:
        raise TypeError(
            f"{what} must have dtype torch.int64 (from dicefn.random.key), got {key.dtype}."
        )
    if key.shape != (2,):
        hint = (
            " For a batch of keys, map over them with torch.func.vmap."
            if key.ndim > 1 and key.shape[-1] == 2
            else " Make one with dicefn.random.key(seed)."
        )
        raise ValueError(f"{what} must have shape (2,), got {tuple(key.shape)}.{hint}")
    return key


def _shape(shape: Shape) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must have non-negative sizes, got {shape}.")
    return shape


def _blocks(key: torch.Tensor, domain: int, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Threefry of ``key`` over counters ``(domain, 0..num-1)``."""
    counter = torch.arange(num, dtype=torch.int64, device=key.device)
    hi = torch.full_like(counter, domain)
    return threefry2x32(key[0], key[1], hi, counter)


def key(seed: int | torch.Tensor) -> torch.Tensor:
    """Makes a key from an integer seed.

    Args:
      seed: a Python int in ``[-2**63, 2**64)`` (taken modulo ``2**64``), or an integer
        tensor of shape ``()`` (so ``vmap`` over a tensor of seeds makes a stack of keys).

    Returns:
      The key: an ``int64`` tensor of shape ``(2,)``, the seed's high and low 32-bit words.

    Raises:
      TypeError: ``seed`` is neither an int nor an integer tensor.
      ValueError: ``seed`` is out of range or not a scalar.

    Example:
      >>> import dicefn as dice
      >>> dice.random.key(42)
      tensor([ 0, 42])
    """
    if isinstance(seed, bool):
        raise TypeError("seed must be an int or an integer tensor, got bool.")
    if isinstance(seed, int):
        if not -(1 << 63) <= seed < (1 << 64):
            raise ValueError(f"seed must lie in [-2**63, 2**64), got {seed}.")
        seed %= 1 << 64
        return torch.tensor([seed >> 32, seed & _MASK], dtype=torch.int64)
    if isinstance(seed, torch.Tensor):
        checks.check_integer(seed, "seed")
        if seed.ndim != 0:
            raise ValueError(
                f"seed must be a scalar tensor, got shape {tuple(seed.shape)}; vmap over a "
                "tensor of seeds to make a stack of keys."
            )
        s = seed.to(torch.int64)
        return torch.stack([(s >> 32) & _MASK, s & _MASK])
    raise TypeError(f"seed must be an int or an integer tensor, got {type(seed).__name__}.")


def split(key: torch.Tensor, num: int = 2) -> torch.Tensor:
    """Splits a key into ``num`` new, independent keys.

    Args:
      key: a key, shape ``(2,)``.
      num: how many keys to make, ``>= 1``.

    Returns:
      Stacked keys, shape ``(num, 2)``; index it (``k1, k2 = split(key)``) or ``vmap`` over it.

    Example:
      >>> import dicefn as dice
      >>> keys = dice.random.split(dice.random.key(0), 3)
      >>> keys.shape
      torch.Size([3, 2])
    """
    check_key(key)
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}.")
    y0, y1 = _blocks(key, _SPLIT, num)
    return torch.stack([y0, y1], dim=-1)


def fold_in(key: torch.Tensor, data: int | torch.Tensor) -> torch.Tensor:
    """Derives a new key from ``key`` and an integer (a step, a rank, an example index).

    ``fold_in(key, i)`` for different ``i`` gives independent keys, reproducibly: e.g.
    ``fold_in(key, torch.distributed.get_rank())`` gives every process its own stream.

    Args:
      key: a key, shape ``(2,)``.
      data: a Python int in ``[0, 2**32)``, or an integer tensor of shape ``()`` whose low
        32 bits are used.

    Returns:
      A new key, shape ``(2,)``.
    """
    check_key(key)
    if isinstance(data, bool):
        raise TypeError("data must be an int or an integer tensor, got bool.")
    if isinstance(data, int):
        if not 0 <= data < (1 << 32):
            raise ValueError(f"data must lie in [0, 2**32), got {data}.")
        d = torch.tensor(data, dtype=torch.int64, device=key.device)
    elif isinstance(data, torch.Tensor):
        checks.check_integer(data, "data")
        if data.ndim != 0:
            raise ValueError(f"data must be a scalar, got shape {tuple(data.shape)}.")
        d = data.to(device=key.device, dtype=torch.int64) & _MASK
    else:
        raise TypeError(f"data must be an int or an integer tensor, got {type(data).__name__}.")
    y0, y1 = threefry2x32(key[0], key[1], torch.full_like(d, _FOLD), d.clone())
    return torch.stack([y0, y1])


def _words(key: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` random 32-bit words (flat ``int64``), two per Threefry block."""
    if n > _MAX_WORDS:
        raise ValueError(f"a single draw is limited to 2**32 words, asked for {n}.")
    m = (n + 1) // 2
    y0, y1 = _blocks(key, _DRAW, m)
    return torch.cat([y0, y1])[:n]


def bits(key: torch.Tensor, shape: Shape = ()) -> torch.Tensor:
    """Uniformly random 32-bit words.

    Args:
      key: a key, shape ``(2,)``.
      shape: the output shape.

    Returns:
      An ``int64`` tensor of the given shape, values uniform in ``[0, 2**32)``.
    """
    check_key(key)
    shape = _shape(shape)
    return _words(key, math.prod(shape)).reshape(shape)


def _float_dtype(dtype: torch.dtype | None) -> torch.dtype:
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype}.")
    return dtype


def _open_uniform(key: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``n`` uniforms in the open interval (0, 1), flat.

    float64 takes 52 random bits (two words), every other dtype 23 bits (one word) computed
    in float32; ``(k + 1/2) * 2**-bits`` is exact in the working dtype, so 0 and 1 never occur.
    """
    if dtype == torch.float64:
        w = _words(key, 2 * n)
        k = ((w[:n] >> 6) << 26) | (w[n:] >> 6)
        return (k.to(torch.float64) + 0.5) * 2.0**-52
    w = _words(key, n)
    return ((w >> 9).to(torch.float32) + 0.5) * 2.0**-23


def _working(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def uniform(
    key: torch.Tensor,
    shape: Shape = (),
    dtype: torch.dtype | None = None,
    minval: float = 0.0,
    maxval: float = 1.0,
) -> torch.Tensor:
    """Uniform draws in ``(minval, maxval)``.

    Args:
      key: a key, shape ``(2,)``.
      shape: the output shape.
      dtype: a floating dtype; default ``torch.get_default_dtype()``. float64 draws carry 52
        random bits, others 23 (half-precision results are rounded from float32 and may
        touch the interval's ends).
      minval, maxval: the interval.

    Returns:
      A tensor of the given shape and dtype on the key's device.
    """
    check_key(key)
    shape, dtype = _shape(shape), _float_dtype(dtype)
    u = _open_uniform(key, math.prod(shape), _working(dtype))
    if minval != 0.0 or maxval != 1.0:
        u = minval + (maxval - minval) * u
    return u.reshape(shape).to(dtype)


def normal(key: torch.Tensor, shape: Shape = (), dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal draws (Box-Muller on pairs of open uniforms).

    Args:
      key: a key, shape ``(2,)``.
      shape: the output shape.
      dtype: a floating dtype; default ``torch.get_default_dtype()``.

    Returns:
      A tensor of the given shape and dtype on the key's device.
    """
    check_key(key)
    shape, dtype = _shape(shape), _float_dtype(dtype)
    n = math.prod(shape)
    m = (n + 1) // 2
    u = _open_uniform(key, 2 * m, _working(dtype))
    radius = torch.sqrt(-2.0 * torch.log(u[:m]))
    angle = (2.0 * math.pi) * u[m:]
    z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]
    return z.reshape(shape).to(dtype)


def gumbel(key: torch.Tensor, shape: Shape = (), dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard Gumbel draws, ``-log(-log(u))``.

    Args:
      key: a key, shape ``(2,)``.
      shape: the output shape.
      dtype: a floating dtype; default ``torch.get_default_dtype()``.

    Returns:
      A tensor of the given shape and dtype on the key's device.
    """
    check_key(key)
    shape, dtype = _shape(shape), _float_dtype(dtype)
    u = _open_uniform(key, math.prod(shape), _working(dtype))
    return (-torch.log(-torch.log(u))).reshape(shape).to(dtype)
