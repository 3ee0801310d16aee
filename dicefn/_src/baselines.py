"""Baselines as pure ``(init, update)`` pairs whose state is a NamedTuple of tensors.

A :class:`Baseline` is modelled on optax's ``GradientTransformation``: two pure functions,
``init`` building a state from an example cost and ``update`` returning the baseline term for
a batch together with the next state. Nothing is mutated, so a baseline runs inside
``torch.func.grad``/``hessian``, under ``vmap`` over a stack of states (one per task) and
under ``torch.compile``, and its state is saved with ``torch.save`` and loaded with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Protocol, Union

import torch

from dicefn._src import checks
from dicefn._src.dice import Nodes, baseline_term, batch_baseline_term

# A baseline's state: a NamedTuple whose leaves are all tensors (possibly none).
BaselineState = Any


class BaselineInitFn(Protocol):
    """``init(cost) -> state``: the state of a baseline that has seen no data.

    Args:
      cost: an example cost batch, shape ``[B, *S]``, floating point. Only its dtype, device
        and trailing shape ``S`` are used (never its values).

    Returns:
      The initial state: a NamedTuple of tensors on ``cost.device``.
    """

    def __call__(self, cost: torch.Tensor) -> BaselineState: ...


class BaselineUpdateFn(Protocol):
    """``update(state, cost, nodes) -> (term, new_state)``: one batch through a baseline.

    Args:
      state: the state returned by ``init`` or by the previous ``update``. Not mutated.
      cost: costs of this batch, shape ``[B, *S]``, floating point.
      nodes: the pytree of log-probability tensors passed to :func:`dicefn.cost_node` with
        ``cost``.

    Returns:
      ``(term, new_state)``. ``term`` has shape ``[B, *S]``, is zero in the forward pass and
      is :func:`dicefn.baseline_term` of the baseline value held in ``state`` (before this
      batch, so the baseline never depends on the samples it is applied to): add it to the
      surrogate. ``new_state`` folds in this batch (detached) and has the structure, shapes
      and dtypes of ``state``.
    """

    def __call__(
        self, state: BaselineState, cost: torch.Tensor, nodes: Nodes
    ) -> tuple[torch.Tensor, BaselineState]: ...


class Baseline(NamedTuple):
    """A baseline as a pair of pure functions, ``(init, update)``.

    Thread the state through a training loop as you would an optimiser state::

        baseline = dicefn.ema_baseline(decay=0.99)
        state = baseline.init(cost)                        # example cost: dtype, device, shape
        term, state = baseline.update(state, cost, nodes)  # term: zero, value held before
        loss = (dicefn.cost_node(cost, nodes) + term).mean()

    States are NamedTuples of tensors, so ``torch.func.vmap(baseline.update)`` runs one
    baseline per task over a stacked state, and ``torch.save``/``torch.load(...,
    weights_only=True)`` round-trip them (``import dicefn`` registers the state classes with
    ``torch.serialization.add_safe_globals``).

    Attributes:
      init: a :class:`BaselineInitFn`.
      update: a :class:`BaselineUpdateFn`.
    """

    init: BaselineInitFn
    update: BaselineUpdateFn


class EmaState(NamedTuple):
    """State of :func:`ema_baseline`. Every leaf is a tensor.

    Attributes:
      biased_mean: the exponential moving average of batch means, started at zero (hence
        biased towards zero), shape ``cost.shape[1:]``.
      decay_product: ``decay ** (number of batches seen)``, shape ``()``.
    """

    biased_mean: torch.Tensor  # shape=cost.shape[1:]
    decay_product: torch.Tensor  # shape=()


class LeaveOneOutState(NamedTuple):
    """State of :func:`leave_one_out`: empty, since that baseline keeps nothing."""


# ``batch_sum_and_count(cost) -> (sum over dim 0, count)`` for a detached cost ``[B, *S]``.
# The local version sums this batch; a distributed one all-reduces both across ranks.
BatchSumAndCount = Callable[[torch.Tensor], tuple[torch.Tensor, Union[torch.Tensor, int]]]


def _local_sum_and_count(cost: torch.Tensor) -> tuple[torch.Tensor, int]:
    return cost.sum(dim=0), cost.shape[0]


def _check_cost(cost: Any, what: str) -> torch.Tensor:
    checks.check_floating(cost, "cost")
    if cost.ndim == 0:
        raise ValueError(
            f"{what}: cost is a scalar; it needs a batch dimension, shape [B, ...] "
            "(use cost[None] for a single sample)."
        )
    return cost


def _check_decay(decay: Any) -> float:
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise TypeError(f"ema_baseline: decay must be a real number, got {type(decay).__name__}.")
    decay = float(decay)
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema_baseline: decay must lie in [0, 1), got {decay}.")
    return decay


def _ema(decay: float, batch_sum_and_count: BatchSumAndCount, name: str) -> Baseline:
    """The EMA baseline, with its batch statistics taken from ``batch_sum_and_count``.

    ``batch_sum_and_count`` maps a detached cost ``[B, *S]`` (in the state's dtype) to its sum
    over dim 0 (shape ``S``) and the number of samples summed (int or tensor); the batch mean
    folded into the average is their ratio. Replacing it (e.g. by an all-reduce of both
    across ranks) gives the same baseline over a larger batch.
    """
    decay = _check_decay(decay)

    def init_fn(cost: torch.Tensor) -> EmaState:
        _check_cost(cost, f"{name}.init")
        dtype = checks.compute_dtype(cost)
        return EmaState(
            biased_mean=torch.zeros(cost.shape[1:], dtype=dtype, device=cost.device),
            decay_product=torch.ones((), dtype=dtype, device=cost.device),
        )

    def update_fn(
        state: EmaState, cost: torch.Tensor, nodes: Nodes
    ) -> tuple[torch.Tensor, EmaState]:
        if not isinstance(state, EmaState):
            raise TypeError(
                f"{name}.update: state must be an EmaState (from init), got "
                f"{type(state).__name__}."
            )
        _check_cost(cost, f"{name}.update")
        mean, product = state
        if tuple(cost.shape[1:]) != tuple(mean.shape):
            raise ValueError(
                f"{name}.update: cost of shape {tuple(cost.shape)} does not match the state, "
                f"whose baseline has shape {tuple(mean.shape)} (expected cost shape "
                f"[B, {', '.join(map(str, mean.shape))}])."
            )
        if mean.dtype != checks.compute_dtype(cost):
            raise TypeError(
                f"{name}.update: cost has dtype {cost.dtype} but the state holds "
                f"{mean.dtype}; build the state with init on a cost of the same dtype."
            )
        tiny = torch.finfo(mean.dtype).tiny
        # Debiased without branching: exactly zero before any data (mean 0, product 1).
        value = (mean / (1.0 - product).clamp(min=tiny)).detach()
        term = baseline_term(value.to(cost.dtype).expand_as(cost), nodes)
        total, count = batch_sum_and_count(cost.detach().to(mean.dtype))
        new_state = EmaState(
            biased_mean=decay * mean + (1.0 - decay) * (total / count),
            decay_product=product * decay,
        )
        return term, new_state

    return Baseline(init_fn, update_fn)


def ema_baseline(decay: float = 0.99) -> Baseline:
    """Exponential-moving-average baseline of the batch mean cost, bias-corrected.

    The baseline value is ``biased_mean / (1 - decay ** k)`` after ``k`` batches, where
    ``biased_mean`` starts at zero and folds in each batch's mean over dim 0 as
    ``decay * biased_mean + (1 - decay) * batch_mean``. Its shape is ``cost.shape[1:]``: for
    costs of shape ``[B, T]`` each position ``t`` gets its own baseline. Before any data the
    value (hence the term) is exactly zero. The debiasing divides by
    ``max(1 - decay ** k, tiny)`` rather than branching on ``k``, so it runs under
    ``vmap`` and ``torch.compile``.

    ``update`` applies the value held *before* the batch (with :func:`dicefn.baseline_term`,
    so it is subtracted at every order of derivative), then folds the batch in; the
    derivatives stay unbiased. On the same stream of costs it gives the same numbers as
    dice-mc 0.1.1's ``EMABaseline`` (which averages ``cost.mean()``: the same for costs of
    shape ``[B]``; per-position here for ``[B, T]``).

    The state (:class:`EmaState`) has the device of the example cost and its dtype
    (float32 for float16/bfloat16 costs, whose terms are then float32 as well).

    Args:
      decay: weight of the past in the average, in ``[0, 1)``. ``0`` uses the previous
        batch's mean.

    Returns:
      A :class:`Baseline`. ``init(cost)`` takes costs of shape ``[B, *S]``;
      ``update(state, cost, nodes)`` returns a term of shape ``[B, *S]`` and the next state.

    Raises:
      TypeError: ``decay`` is not a real number. ``init``/``update`` raise ``TypeError`` for
        a non-floating cost or a cost whose dtype differs from the state's.
      ValueError: ``decay`` is outside ``[0, 1)``. ``init``/``update`` raise ``ValueError``
        for a scalar cost or one whose shape after dim 0 differs from the state's.

    Example:
      >>> import torch, dicefn as dice
      >>> baseline = dice.ema_baseline(decay=0.9)
      >>> logits = torch.zeros(4, 3, requires_grad=True)
      >>> logp, actions = dice.sample_categorical(logits, key=dice.random.key(0))
      >>> cost = actions.to(logits.dtype)
      >>> state = baseline.init(cost)
      >>> term, state = baseline.update(state, cost, logp)
      >>> loss = (dice.cost_node(cost, logp) + term).mean()
      >>> torch.equal(loss, cost.mean()), state.biased_mean.shape
      (True, torch.Size([]))

    References:
      Mao et al., "A Baseline for Any Order Gradient Estimation in Stochastic Computation
      Graphs", ICML 2019 (the any-order term). Kingma and Ba, "Adam", arXiv:1412.6980
      (bias correction of a zero-initialised moving average).
    """
    return _ema(decay, _local_sum_and_count, "ema_baseline")


def leave_one_out(dim: int = 0) -> Baseline:
    """The leave-one-out baseline as a :class:`Baseline` (stateless).

    ``update(state, cost, nodes)`` returns ``batch_baseline_term(cost, nodes, dim)``: each
    cost's baseline is the mean of the other costs along ``dim``. The state is the empty
    :class:`LeaveOneOutState`, so this baseline is used exactly like :func:`ema_baseline`.

    Args:
      dim: the dimension along which costs are independent samples (``1`` for costs of
        shape ``[num_prompts, samples_per_prompt]``).

    Returns:
      A :class:`Baseline` whose ``update`` returns a term of the shape of ``cost`` and the
      (empty) state unchanged.

    Raises:
      TypeError: ``dim`` is not an int. ``update`` raises as
        :func:`dicefn.batch_baseline_term` does (e.g. ``ValueError`` for fewer than two
        samples along ``dim``).

    Example:
      >>> import torch, dicefn as dice
      >>> baseline = dice.leave_one_out()
      >>> cost = torch.tensor([1.0, 2.0, 6.0])
      >>> logp = torch.zeros(3, requires_grad=True)
      >>> state = baseline.init(cost)
      >>> term, state = baseline.update(state, cost, logp)
      >>> torch.autograd.grad((dice.cost_node(cost, logp) + term).sum(), logp)[0]
      tensor([-3.0000, -1.5000,  4.5000])

    References:
      Kool, van Hoof and Welling, "Buy 4 REINFORCE Samples, Get a Baseline for Free!",
      ICLR workshop 2019.
    """
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"leave_one_out: dim must be an int, got {type(dim).__name__}.")

    def init_fn(cost: torch.Tensor) -> LeaveOneOutState:
        checks.check_floating(cost, "cost")
        return LeaveOneOutState()

    def update_fn(
        state: LeaveOneOutState, cost: torch.Tensor, nodes: Nodes
    ) -> tuple[torch.Tensor, LeaveOneOutState]:
        if not isinstance(state, LeaveOneOutState):
            raise TypeError(
                "leave_one_out.update: state must be a LeaveOneOutState (from init), got "
                f"{type(state).__name__}."
            )
        return batch_baseline_term(cost, nodes, dim), state

    return Baseline(init_fn, update_fn)


# States load with ``torch.load(path, weights_only=True)`` once dicefn is imported.
torch.serialization.add_safe_globals([EmaState, LeaveOneOutState])
