"""Data-parallel baselines: batch statistics all-reduced over a ``torch.distributed`` group.

In data-parallel training (DDP, FSDP, launched by ``torchrun``) every rank holds a slice of
the global batch. The DiCE estimator itself is per-sample and needs nothing global: each
rank's surrogate uses its own costs and log-probabilities, and DDP averages the gradients.
Only the batch-dependent baselines see the batch as a whole: the leave-one-out baseline (the
mean of the *other* samples) and the batch mean folded into an EMA baseline. The functions
here compute those statistics over the global batch: the sum of the detached costs and their
count are all-reduced over the group, in one collective per call. Every rank then applies the
same baseline as a single process would on the concatenated batch, and EMA states stay
identical on every rank.

When ``torch.distributed`` is not available or not initialised (or the group has a single
rank), every function here is exactly its local counterpart in :mod:`dicefn`.

The all-reduce is torch's functional collective (``_c10d_functional.all_reduce`` followed
by ``wait_tensor``) wrapped in a custom operator, ``dicefn::all_reduce_sum``, that has a
batching rule. The bare functional collective has none: under ``torch.func.vmap`` torch
falls back to a loop over the batch whose asynchronous results are read before they are
waited for, which gave wrong numbers with gloo in torch 2.13. With the batching rule, the
functions run under ``grad``, ``jacrev``, ``jacfwd``, ``hessian``, ``vmap`` (every rank must
then vmap over the same batch size) and ``torch.compile(fullgraph=True)``, where the
operator appears in the graph as one opaque call. The reduced statistics are detached, so
no derivative ever flows through the collective.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.distributed as dist

from dicefn._src import baselines as _baselines
from dicefn._src import checks
from dicefn._src import dice as _dice
from dicefn._src import prng

# A process group, or None for the default (world) group.
Group = Optional[Any]


@torch.library.custom_op("dicefn::all_reduce_sum", mutates_args=())
def _all_reduce_sum_op(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Sum of ``x`` over the ranks of the group named ``group_name`` (a new tensor)."""
    out = torch.ops._c10d_functional.all_reduce(x.contiguous(), "sum", group_name)
    return torch.ops._c10d_functional.wait_tensor(out)


@_all_reduce_sum_op.register_fake
def _(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_all_reduce_sum_op.register_vmap
def _(info: Any, in_dims: tuple, x: torch.Tensor, group_name: str) -> tuple:
    # The sum over ranks is elementwise: reduce the whole stack in one collective (every
    # rank runs the same vmap, so the stacks have the same shape).
    return _all_reduce_sum_op(x, group_name), in_dims[0]


def _is_non_member(group: Any) -> bool:
    # ``dist.new_group(ranks)`` returns this sentinel (an int) on ranks outside ``ranks``.
    return (
        dist.is_available()
        and isinstance(group, int)
        and not isinstance(group, bool)
        and group == dist.GroupMember.NON_GROUP_MEMBER
    )


def _check_group(group: Any, what: str) -> None:
    if group is None or _is_non_member(group):
        return
    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"{what}: group must be None (the default group) or a "
            f"torch.distributed.ProcessGroup, got {type(group).__name__}."
        )


def _world_size(group: Group, what: str) -> int:
    """Ranks in ``group``; 1 when ``torch.distributed`` is unavailable or not initialised."""
    _check_group(group, what)
    if not dist.is_available() or not dist.is_initialized():
        return 1
    size = -1 if _is_non_member(group) else dist.get_world_size(group)
    if size < 1:
        raise ValueError(
            f"{what}: this process (global rank {dist.get_rank()}) is not a member of the "
            "given process group; call it only on the group's ranks."
        )
    return size


def _global_sum_and_count(
    total: torch.Tensor, count: int, group: Group
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-reduces a local sum (any shape) and a local count, in one collective.

    The count travels in the sum's dtype: exact up to 2**24 samples in float32.
    """
    packed = torch.cat([total.reshape(-1), total.new_full((1,), count)])
    name = (dist.group.WORLD if group is None else group).group_name
    packed = _all_reduce_sum_op(packed, name)
    return packed[:-1].reshape(total.shape), packed[-1]


def _check_dim(dim: Any, what: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{what}: dim must be an int, got {type(dim).__name__}.")
    return dim


def batch_baseline_term(
    cost: torch.Tensor, nodes: _dice.Nodes, dim: int = 0, group: Group = None
) -> torch.Tensor:
    """Leave-one-out baseline term over the global batch of a process group.

    As :func:`dicefn.batch_baseline_term`, but the baseline of entry ``i`` is
    ``(S - cost_i) / (N - 1)`` where ``S`` is the sum of the costs along ``dim`` on **every**
    rank of ``group`` and ``N`` the number of entries along ``dim`` on every rank (both
    all-reduced, detached, in one collective). With ``dim=0`` each rank holds a slice of the
    global batch; with ``dim=1`` and costs of shape ``[num_prompts, k_r]`` every rank holds
    ``k_r`` samples of the *same* prompts, and each prompt's group is the union over ranks.
    The result on each rank is the term a single process would compute for that rank's
    entries of the concatenated batch (``torch.cat`` along ``dim``); with equal local batch
    sizes and a ``.mean()`` loss, the gradient DDP averages is the single-process gradient.

    Every rank of ``group`` must call it (it is a collective), with costs whose shapes agree
    except along ``dim`` (local sizes along ``dim`` may differ). Without an initialised
    process group, or with a group of one rank, it is :func:`dicefn.batch_baseline_term`.

    Args:
      cost: this rank's costs, shape ``[*S]``, floating point.
      nodes: the pytree of log-probability tensors passed to :func:`dicefn.cost_node`.
      dim: the dimension along which entries are independent samples.
      group: the process group (``None``: the default group).

    Returns:
      Zeros of shape ``[*S]`` with the derivatives of global leave-one-out subtraction.
      Half-precision costs are reduced in float32; the baseline takes the cost's dtype.

    Raises:
      TypeError: ``cost`` or a node is not a floating-point tensor, ``dim`` is not an int,
        or ``group`` is not a process group.
      ValueError: ``dim`` is out of range; ``cost`` has no entry along ``dim`` (fewer than
        two in a single process: the global batch must hold at least two, which one
        entry on each of two or more ranks guarantees); a node does not align with
        ``cost``; this process is not in ``group``. A rank that raises leaves the others
        waiting in the collective until the process group's timeout.

    Example:
      >>> import torch, dicefn as dice, dicefn.distributed
      >>> logits = torch.zeros(16, 3, requires_grad=True)
      >>> logp, actions = dice.sample_categorical(logits, key=dice.random.key(2))
      >>> cost = actions.to(logits.dtype)
      >>> term = dice.distributed.batch_baseline_term(cost, logp)  # one process: local
      >>> torch.equal(term, dice.batch_baseline_term(cost, logp))
      True

    References:
      Kool, van Hoof and Welling, "Buy 4 REINFORCE Samples, Get a Baseline for Free!",
      ICLR workshop 2019.
    """
    what = "distributed.batch_baseline_term"
    _check_dim(dim, what)
    size = _world_size(group, what)
    if size == 1:
        return _dice.batch_baseline_term(cost, nodes, dim)
    checks.check_floating(cost, "cost")
    if cost.ndim == 0:
        raise ValueError(f"{what}: cost is a scalar; it needs a batch dimension.")
    if not -cost.ndim <= dim < cost.ndim:
        raise ValueError(
            f"{what}: dim {dim} is out of range for cost of shape {tuple(cost.shape)}."
        )
    if cost.shape[dim] < 1:
        raise ValueError(
            f"{what}: needs at least 1 sample along dim {dim} on every rank, got cost of "
            f"shape {tuple(cost.shape)}."
        )
    c = cost.detach().to(checks.compute_dtype(cost))
    total, count = _global_sum_and_count(c.sum(dim=dim, keepdim=True), cost.shape[dim], group)
    baseline = ((total - c) / (count - 1)).to(cost.dtype)
    return _dice.baseline_term(baseline, nodes)


def leave_one_out(dim: int = 0, group: Group = None) -> _baselines.Baseline:
    """The global leave-one-out baseline as a :class:`dicefn.Baseline` (stateless).

    ``update(state, cost, nodes)`` returns
    :func:`dicefn.distributed.batch_baseline_term` ``(cost, nodes, dim, group)`` and the
    empty state: a drop-in replacement for :func:`dicefn.leave_one_out` in data-parallel
    training. Whether the process group is initialised is decided at each ``update``.

    Args:
      dim: the dimension along which costs are independent samples.
      group: the process group (``None``: the default group).

    Returns:
      A :class:`dicefn.Baseline` with the empty :class:`dicefn.LeaveOneOutState`.

    Raises:
      TypeError: ``dim`` is not an int or ``group`` is not a process group. ``update``
        raises as :func:`dicefn.distributed.batch_baseline_term` does.

    Example:
      >>> import torch, dicefn as dice, dicefn.distributed
      >>> baseline = dice.distributed.leave_one_out()
      >>> cost = torch.tensor([1.0, 2.0, 6.0])
      >>> logp = torch.zeros(3, requires_grad=True)
      >>> term, state = baseline.update(baseline.init(cost), cost, logp)
      >>> torch.autograd.grad((dice.cost_node(cost, logp) + term).sum(), logp)[0]
      tensor([-3.0000, -1.5000,  4.5000])

    References:
      Kool, van Hoof and Welling, "Buy 4 REINFORCE Samples, Get a Baseline for Free!",
      ICLR workshop 2019.
    """
    what = "distributed.leave_one_out"
    _check_dim(dim, what)
    _check_group(group, what)

    def init_fn(cost: torch.Tensor) -> _baselines.LeaveOneOutState:
        checks.check_floating(cost, "cost")
        return _baselines.LeaveOneOutState()

    def update_fn(
        state: _baselines.LeaveOneOutState, cost: torch.Tensor, nodes: _dice.Nodes
    ) -> tuple[torch.Tensor, _baselines.LeaveOneOutState]:
        if not isinstance(state, _baselines.LeaveOneOutState):
            raise TypeError(
                f"{what}.update: state must be a LeaveOneOutState (from init), got "
                f"{type(state).__name__}."
            )
        return batch_baseline_term(cost, nodes, dim, group), state

    return _baselines.Baseline(init_fn, update_fn)


def _sum_and_count(group: Group, cost: torch.Tensor) -> tuple[torch.Tensor, Any]:
    if _world_size(group, "distributed.ema_baseline.update") == 1:
        return _baselines._local_sum_and_count(cost)
    return _global_sum_and_count(cost.sum(dim=0), cost.shape[0], group)


def ema_baseline(decay: float = 0.99, group: Group = None) -> _baselines.Baseline:
    """EMA baseline whose batch mean is taken over the global batch of a process group.

    As :func:`dicefn.ema_baseline` (bias-corrected moving average of the batch mean over
    dim 0, per position for costs ``[B, *S]``), but the batch mean folded in at each
    ``update`` is ``(sum of the costs on every rank) / (number of costs on every rank)``,
    both all-reduced in one collective. Started from the same state (``init`` is local and
    deterministic), every rank therefore holds the same state after every update, equal to
    that of a single process fed the concatenated batches, and applies the same baseline.
    Local batch sizes may differ between ranks; shapes after dim 0 must agree.

    Every rank of ``group`` must call ``update`` (it is a collective). Without an
    initialised process group (decided at each ``update``), or with a group of one rank, it
    is :func:`dicefn.ema_baseline`.

    Args:
      decay: weight of the past in the average, in ``[0, 1)``.
      group: the process group (``None``: the default group).

    Returns:
      A :class:`dicefn.Baseline` whose state is a :class:`dicefn.EmaState`.

    Raises:
      TypeError: ``decay`` is not a real number or ``group`` is not a process group;
        ``init``/``update`` raise as in :func:`dicefn.ema_baseline`.
      ValueError: ``decay`` is outside ``[0, 1)``; ``init``/``update`` raise as in
        :func:`dicefn.ema_baseline`, and ``update`` if this process is not in ``group``.

    Example:
      >>> import torch, dicefn as dice, dicefn.distributed
      >>> baseline = dice.distributed.ema_baseline(decay=0.9)
      >>> cost = torch.tensor([1.0, 2.0, 6.0])
      >>> state = baseline.init(cost)
      >>> term, state = baseline.update(state, cost, torch.zeros(3, requires_grad=True))
      >>> state.biased_mean  # (1 - 0.9) * mean(cost), over every rank's costs
      tensor(0.3000)

    References:
      Mao et al., "A Baseline for Any Order Gradient Estimation in Stochastic Computation
      Graphs", ICML 2019 (the any-order term). Kingma and Ba, "Adam", arXiv:1412.6980
      (bias correction of a zero-initialised moving average).
    """
    _check_group(group, "distributed.ema_baseline")
    return _baselines._ema(
        decay, functools.partial(_sum_and_count, group), "distributed.ema_baseline"
    )


def rank_key(key: torch.Tensor, group: Group = None) -> torch.Tensor:
    """This rank's key: ``dicefn.random.fold_in(key, rank)``, rank within ``group``.

    Give every rank the same ``key`` (the same seed); ``rank_key`` derives an independent,
    reproducible stream per rank, so the global batch is the concatenation of the ranks'
    draws in rank order and does not depend on timing. Without an initialised process
    group the rank is 0: a single process draws exactly what rank 0 draws. Derive a fresh
    key per step first (``rank_key(fold_in(key, step))``) so steps are independent too.
    With ``group`` a data-parallel subgroup, ranks that share a position in it (e.g. the
    tensor-parallel shards of one replica) get the same key.

    Args:
      key: a key, shape ``(2,)``, the same on every rank.
      group: the process group (``None``: the default group).

    Returns:
      A new key, shape ``(2,)``.

    Raises:
      TypeError: ``key`` is not a key or ``group`` is not a process group.
      ValueError: this process is not in ``group``.

    Example:
      >>> import dicefn as dice, dicefn.distributed
      >>> key = dice.random.key(0)
      >>> bool((dice.distributed.rank_key(key) == dice.random.fold_in(key, 0)).all())
      True
    """
    what = "distributed.rank_key"
    prng.check_key(key)
    _world_size(group, what)  # checks the group and that this process belongs to it
    rank = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
    return prng.fold_in(key, rank)

