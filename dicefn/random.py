"""Explicit, counter-based pseudo-random keys (Threefry-2x32-20).

A key is an ``int64`` tensor of shape ``(2,)``. Draws are pure functions of the key, built
from integer tensor ops only, so a function that samples inside can be differentiated with
``torch.func.hessian``/``jacrev``/``jacfwd`` and vmapped over a stack of keys (one
independent draw per key)::

    import dicefn as dice
    key = dice.random.key(0)
    k_policy, k_env = dice.random.split(key)       # two independent keys
    keys = dice.random.split(k_policy, 64)         # shape (64, 2): vmap over these
    u = dice.random.uniform(k_env, (3, 4))

Use each key for one draw; split or fold in to get more. Same key, same shape: same draws.
See :func:`threefry2x32` for the algorithm and its cost.
"""

from dicefn._src.prng import (
    bits,
    fold_in,
    gumbel,
    key,
    normal,
    split,
    threefry2x32,
    uniform,
)

__all__ = [
    "bits",
    "fold_in",
    "gumbel",
    "key",
    "normal",
    "split",
    "threefry2x32",
    "uniform",
]
