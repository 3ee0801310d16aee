"""Data-parallel training: baselines whose batch statistics span a ``torch.distributed`` group.

The DiCE estimator needs nothing global: each rank builds its surrogate from its own costs
and log-probabilities, and DDP (or FSDP) averages the gradients. Only batch-dependent
baselines change: here the leave-one-out sums and counts, and the EMA's batch mean, are
all-reduced over the group, so every rank applies the baseline a single process would on
the concatenated global batch. Give every rank its own random stream with
:func:`rank_key`. Without an initialised process group every function is its local
counterpart::

    import dicefn as dice
    import dicefn.distributed

    key = dice.distributed.rank_key(dice.random.fold_in(key, step))  # per rank, per step
    logp, actions = dice.sample_categorical(logits, key=key)
    cost = ...
    loss = dice.cost_node(cost, logp) + dice.distributed.batch_baseline_term(cost, logp)
    loss.mean().backward()                                           # DDP averages
"""

from dicefn._src.distributed import (
    batch_baseline_term,
    ema_baseline,
    leave_one_out,
    rank_key,
)

__all__ = [
    "batch_baseline_term",
    "ema_baseline",
    "leave_one_out",
    "rank_key",
]
