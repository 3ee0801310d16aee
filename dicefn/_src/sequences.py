"""Sequences: discounted cumulative sums, Loaded DiCE, returns and GAE."""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from dicefn._src import checks
from dicefn._src.dice import magic_box

Lam = Union[float, torch.Tensor]

# Block length of the blocked scan in ``discounted_cumsum``: inside a block the weights
# ``lam**(i - j)`` form a [BLOCK, BLOCK] lower-triangular matrix (one matmul); blocks are
# joined by the same scan applied, recursively, to the block totals with ``lam**BLOCK``.
_BLOCK = 64


def _check_dim(x: torch.Tensor, dim: int, what: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{what}: dim must be an int, got {type(dim).__name__}.")
    if x.ndim == 0:
        raise ValueError(f"{what}: needs a time dimension, got a scalar (shape ()).")
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"{what}: dim {dim} is out of range for shape {tuple(x.shape)}.")
    return dim % x.ndim


def _check_unit(value: object, name: str, what: str, allow_tensor: bool = True) -> Lam:
    """A hyperparameter in [0, 1]: a Python number (checked) or a 0-dim floating tensor."""
    if isinstance(value, bool):
        raise TypeError(f"{what}: {name} must be a float in [0, 1], got bool.")
    if isinstance(value, (int, float)):
        v = float(value)
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{what}: {name} must lie in [0, 1], got {value}.")
        return v
    if allow_tensor and isinstance(value, torch.Tensor):
        if value.ndim != 0 or not value.is_floating_point():
            raise ValueError(
                f"{what}: a tensor {name} must be a 0-dim floating tensor, got shape "
                f"{tuple(value.shape)} and dtype {value.dtype}."
            )
        return value
    kinds = "a float in [0, 1] or a 0-dim floating tensor" if allow_tensor else "a float in [0, 1]"
    raise TypeError(f"{what}: {name} must be {kinds}, got {type(value).__name__}.")


def _decay_matrix(lam: torch.Tensor, n: int) -> torch.Tensor:
    """``M[i, j] = lam**(i - j)`` for ``i >= j``, else 0; shape ``[n, n]``. No negative powers."""
    idx = torch.arange(n, device=lam.device)
    diff = idx[:, None] - idx[None, :]
    powers = lam ** diff.clamp(min=0).to(lam.dtype)
    return torch.where(diff >= 0, powers, torch.zeros_like(powers))


def _scan_last(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Discounted cumulative sum along the last dimension, blocked (see ``_BLOCK``)."""
    t = x.shape[-1]
    if t <= _BLOCK:
        return x @ _decay_matrix(lam, t).transpose(0, 1)
    nb = -(-t // _BLOCK)
    xp = F.pad(x, (0, nb * _BLOCK - t))
    blocks = xp.reshape(*x.shape[:-1], nb, _BLOCK)
    local = blocks @ _decay_matrix(lam, _BLOCK).transpose(0, 1)  # sums within each block
    totals = _scan_last(local[..., -1], lam**_BLOCK)  # exact sums at block ends
    carry = F.pad(totals[..., :-1], (1, 0))  # the previous block's total (0 for block 0)
    decay = lam ** torch.arange(1, _BLOCK + 1, device=x.device).to(lam.dtype)
    y = local + carry.unsqueeze(-1) * decay
    return y.reshape(*x.shape[:-1], nb * _BLOCK)[..., :t]


def discounted_cumsum(x: torch.Tensor, lam: Lam, dim: int = -1) -> torch.Tensor:
    """Discounted cumulative sum: ``w_t = sum_{t' <= t} lam**(t - t') * x_t'``.

    Equivalently ``w_t = lam * w_{t-1} + x_t``. ``lam=1`` is the prefix sum that makes
    per-step cost nodes causal (``cost_node(c, discounted_cumsum(logp, 1.0))`` gives the
    cost at step ``t`` the log-probabilities of steps ``<= t``); ``lam=0`` is the identity;
    in between it is Loaded DiCE's weighted dependency (:func:`loaded_dice`). For a sum in
    reverse time (returns, cost-to-go), flip: ``discounted_cumsum(x.flip(d), g, d).flip(d)``.

    Computed without a loop over time and without negative powers of ``lam`` (finite for
    every ``lam`` in [0, 1] and any length): ``lam=1`` uses ``torch.cumsum``; otherwise
    blocks of 64 steps are summed with one matmul against the [64, 64] lower-triangular
    matrix ``lam**(i - j)``, and blocks are joined by the same scan over block totals with
    factor ``lam**64`` (recursively, so a length of 4096 takes two levels). Work is
    ``O(64 * x.numel())``, extra memory ``O(x.numel())``; for a float ``lam`` autograd saves
    no tensor of the size of ``x``. Differentiable to any order, also with respect to a
    tensor ``lam``. float16/bfloat16 inputs are scanned in float32 and rounded back.

    Args:
      x: values, floating point, time along ``dim`` (any other dimensions are batch).
      lam: the decay, a Python float in [0, 1] (checked), or a 0-dim floating tensor (not
        range-checked: its value is not read, so ``lam`` can be vmapped or differentiated).
      dim: the time dimension.

    Returns:
      A tensor of the shape and dtype of ``x``.

    Raises:
      TypeError: ``x`` is not a floating-point tensor, or ``lam``/``dim`` has a wrong type.
      ValueError: ``lam`` is outside [0, 1], a tensor ``lam`` is not 0-dim, or ``dim`` is
        out of range.

    Example:
      >>> import torch, dicefn as dice
      >>> dice.discounted_cumsum(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.5)
      tensor([1.0000, 1.5000, 1.7500, 1.8750])

    References:
      Farquhar, Whiteson and Foerster, "Loaded DiCE: Trading off Bias and Variance in
      Any-Order Score Function Estimators for Reinforcement Learning", NeurIPS 2019,
      arXiv:1909.10549.
    """
    checks.check_floating(x, "x")
    d = _check_dim(x, dim, "discounted_cumsum")
    lam = _check_unit(lam, "lam", "discounted_cumsum")
    if isinstance(lam, float) and lam == 1.0:
        return torch.cumsum(x, dim=d)
    if x.shape[d] == 0 or (isinstance(lam, float) and lam == 0.0):
        return x.clone()
    work = checks.compute_dtype(x)  # half precision is scanned in float32
    if isinstance(lam, float):
        lam_t = torch.tensor(lam, dtype=work, device=x.device)
    else:
        lam_t = lam.to(dtype=work, device=x.device)
    y = _scan_last(x.movedim(d, -1).to(work), lam_t).movedim(-1, d)
    return y.to(x.dtype)


def loaded_dice(
    logp: torch.Tensor, advantages: torch.Tensor, lam: Lam = 1.0, dim: int = -1
) -> torch.Tensor:
    """Per-step Loaded DiCE terms: ``(magic_box(w_t) - magic_box(w_t - logp_t)) * A_t``.

    ``w = discounted_cumsum(logp, lam, dim)``. Every term is zero in the forward pass; sum
    over time (and average over a batch) and minimise: the derivatives estimate those of
    the expected total cost when ``advantages`` are advantages of **costs** (for rewards,
    pass ``-advantages``, or maximise). ``lam`` trades bias for variance at orders >= 2:

    * ``lam=1``: ``w_t`` is the prefix sum and the term is the any-order baseline form
      ``(box(a_{<=t}) - box(a_{<t})) * A_t``. Unbiased at **every** order when ``A_t`` is an
      unbiased advantage (e.g. cost-to-go minus a baseline that does not depend on step
      ``t``'s sample or later ones). With ``A_t`` the cost-to-go ``sum_{t'>=t} c_t'``, each
      sample has the same derivatives as the prefix-sum DiCE surrogate
      ``sum_t box(w_t) * c_t`` (indeed ``sum_t term_t + A_0`` equals it as a function).
    * ``lam=0``: the term is ``(box(logp_t) - 1) * A_t``: a first-order (policy-gradient)
      estimator per step; its higher derivatives miss the cross-step terms (biased, low
      variance).
    * ``0 < lam < 1``: older steps' influence on higher derivatives decays as ``lam**k``.

    Advantages are used as given. Pass them detached when they come from a learned critic
    (the usual case); their own parameter dependence would otherwise add terms at order 2
    and above. For the derivative of a discounted objective ``sum_t gamma**t c_t``, weight
    the advantages by ``gamma**t`` (as the authors' code does); :func:`gae` does not.

    Args:
      logp: log-probabilities of the sampled action at each step, floating point, time
        along ``dim``; zero at padded steps.
      advantages: advantages of costs, floating point, broadcastable with ``logp``.
      lam: the dependency decay in [0, 1], as in :func:`discounted_cumsum`.
      dim: the time dimension of ``logp``.

    Returns:
      The per-step terms, shape ``broadcast(logp.shape, advantages.shape)``, all zero.

    Raises:
      TypeError: an input is not a floating-point tensor, or ``lam`` has a wrong type.
      ValueError: the shapes do not broadcast, or ``lam``/``dim`` is out of range.

    Example:
      >>> import torch, dicefn as dice
      >>> logits = torch.zeros(8, 5, 3, requires_grad=True)        # [batch, time, actions]
      >>> logp, actions = dice.sample_categorical(logits, key=dice.random.key(0))
      >>> costs = (actions == 1).to(torch.float32)                  # [batch, time]
      >>> adv = dice.returns(costs, 0.9) - 1.0                      # cost-to-go - baseline
      >>> loss = dice.loaded_dice(logp, adv, lam=0.5).sum(-1).mean()
      >>> loss.item()
      0.0
      >>> loss.backward()

    References:
      Farquhar, Whiteson and Foerster, NeurIPS 2019, arXiv:1909.10549. Mao et al., "A
      Baseline for Any Order Gradient Estimation in Stochastic Computation Graphs",
      ICML 2019.
    """
    checks.check_floating(logp, "logp")
    checks.check_floating(advantages, "advantages")
    checks.broadcast_shapes("loaded_dice", logp=logp.shape, advantages=advantages.shape)
    w = discounted_cumsum(logp, lam, dim)
    return (magic_box(w) - magic_box(w - logp)) * advantages


def _linear_scan(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``y_t = x_t + a_t * y_{t-1}`` (``y_{-1} = 0``) along the last dim, log-depth.

    Hillis-Steele doubling: ``ceil(log2 T)`` steps of ``y_t += A_t * y_{t-s}`` and
    ``A_t *= A_{t-s}``, where ``A_t`` is the product of the ``a`` over the span already
    covered. The factors lie in [0, 1], so nothing overflows.
    """
    t = x.shape[-1]
    y, coef = x, a
    s = 1
    while s < t:
        y = y + coef * F.pad(y[..., :-s], (s, 0))
        coef = coef * F.pad(coef[..., :-s], (s, 0))
        s *= 2
    return y


def _check_flags(
    flags: torch.Tensor | None, name: str, shape: torch.Size, what: str
) -> torch.Tensor | None:
    if flags is None:
        return None
    checks.check_tensor(flags, name)
    if flags.is_floating_point() or flags.is_complex():
        raise TypeError(
            f"{what}: {name} must be a bool (or 0/1 integer) tensor, got dtype {flags.dtype}."
        )
    if tuple(flags.shape) != tuple(shape):
        raise ValueError(
            f"{what}: {name} must have the shape of rewards {tuple(shape)}, got "
            f"{tuple(flags.shape)}."
        )
    return flags != 0


def _advantages(
    rewards: torch.Tensor,
    values: torch.Tensor | None,
    gamma: float,
    lam: float,
    mask: torch.Tensor | None,
    done: torch.Tensor | None,
) -> torch.Tensor:
    """GAE along the last dim (``values`` None: discounted returns without bootstrap)."""
    valid = mask
    cont = None  # True where step t's episode continues into step t + 1
    if valid is not None:
        nxt = F.pad(valid[..., 1:], (0, 1), value=True)
        cont = valid & nxt
    if done is not None:
        cont = ~done if cont is None else cont & ~done
    if values is None:
        delta = rewards
    else:
        nxt_v = values[..., 1:]
        if cont is not None:
            nxt_v = torch.where(cont, nxt_v, torch.zeros_like(nxt_v))
        delta = rewards + gamma * nxt_v - values[..., :-1]
    if valid is not None:
        delta = torch.where(valid, delta, torch.zeros_like(delta))
    decay = gamma * lam
    if cont is None:
        adv = discounted_cumsum(delta.flip(-1), decay).flip(-1)
    else:
        coef = cont.to(delta.dtype) * decay
        # Reverse time: step t accumulates step t + 1 through cont_t.
        adv = _linear_scan(delta.flip(-1), coef.flip(-1)).flip(-1)
    if valid is not None:
        adv = torch.where(valid, adv, torch.zeros_like(adv))
    return adv


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    gamma: float,
    lam: float,
    dim: int = -1,
    *,
    mask: torch.Tensor | None = None,
    done: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generalised advantage estimates (Schulman et al.), vectorised over time.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = sum_{k>=0} (gamma*lam)**k *
    delta_{t+k}``, computed as a reverse discounted cumulative sum (no loop over time).
    ``values`` has one more step than ``rewards``: its last entry bootstraps the value after
    the last step (pass 0 there if the episode terminates). ``lam=1`` gives the discounted
    return minus ``V_t``; ``lam=0`` gives the one-step ``delta_t``.

    **Signs.** GAE is linear in ``(rewards, values)``. With rewards and reward values it
    returns advantages of rewards (to be maximised); with costs and cost values (expected
    cost-to-go) it returns advantages of costs, which is what :func:`loaded_dice` expects
    (it is minimised). From rewards, either pass ``-rewards, -values`` or negate the result.

    **Episodes of unequal length.** ``mask`` (true at real steps) marks padding: padded
    steps get advantage 0 and their rewards and values are ignored; a real step followed by
    a padded one ends an episode there (no bootstrap); a real step in the last column
    bootstraps from ``values[..., T]``. Several episodes per row, or any pattern of
    padding, are handled. ``done`` (true at the last step of an episode) cuts a row into
    episodes: after a done step neither the next value nor later deltas flow back. With
    ``mask`` or ``done`` the scan is a log-depth linear recurrence (``ceil(log2 T)``
    elementwise passes).

    Only the sum ``sum_{t' >= t}`` is discounted: the advantage of step ``t`` is not weighted
    by ``gamma**t``. For the derivative of the discounted objective ``E[sum_t gamma**t r_t]``
    multiply by ``gamma ** torch.arange(T)`` before :func:`loaded_dice`.

    Args:
      rewards: per-step rewards (or costs), floating point, time along ``dim``, ``T`` steps.
      values: state values ``V(s_0) ... V(s_T)``, the shape of ``rewards`` with ``T + 1``
        steps along ``dim``; usually detached.
      gamma: discount in [0, 1].
      lam: GAE parameter (the papers' ``lambda`` or ``tau``) in [0, 1].
      dim: the time dimension.
      mask: optional bool tensor of the shape of ``rewards``: true at real steps.
      done: optional bool tensor of the shape of ``rewards``: true at an episode's last step.

    Returns:
      Advantages, the shape and dtype of ``rewards``.

    Raises:
      TypeError: an input has a wrong type or dtype.
      ValueError: ``values`` is not ``rewards`` with one more step, flags have the wrong
        shape, or ``gamma``/``lam``/``dim`` is out of range.

    Example:
      >>> import torch, dicefn as dice
      >>> rewards = torch.tensor([1.0, 1.0, 1.0])
      >>> values = torch.tensor([0.0, 0.0, 0.0, 10.0])     # bootstrap V(s_3) = 10
      >>> dice.gae(rewards, values, gamma=0.5, lam=1.0)
      tensor([3., 4., 6.])

    References:
      Schulman, Moritz, Levine, Jordan and Abbeel, "High-Dimensional Continuous Control
      Using Generalized Advantage Estimation", ICLR 2016, arXiv:1506.02438.
    """
    checks.check_floating(rewards, "rewards")
    checks.check_floating(values, "values")
    d = _check_dim(rewards, dim, "gae")
    gamma = _check_unit(gamma, "gamma", "gae", allow_tensor=False)
    lam = _check_unit(lam, "lam", "gae", allow_tensor=False)
    expected = list(rewards.shape)
    expected[d] += 1
    if list(values.shape) != expected:
        raise ValueError(
            f"gae: values must have the shape of rewards with one more step along dim {dim} "
            f"(the bootstrap value last): expected {tuple(expected)}, got {tuple(values.shape)}."
        )
    mask = _check_flags(mask, "mask", rewards.shape, "gae")
    done = _check_flags(done, "done", rewards.shape, "gae")
    mv = lambda z: None if z is None else z.movedim(d, -1)  # noqa: E731
    adv = _advantages(mv(rewards), mv(values), gamma, lam, mv(mask), mv(done))
    return adv.movedim(-1, d)


def returns(
    rewards: torch.Tensor,
    gamma: float,
    dim: int = -1,
    *,
    mask: torch.Tensor | None = None,
    done: torch.Tensor | None = None,
) -> torch.Tensor:
    """Discounted returns (reward-to-go, or cost-to-go): ``G_t = sum_{k>=0} gamma**k r_{t+k}``.

    Nothing is bootstrapped after the last step (use :func:`gae` with ``lam=1`` for a
    bootstrapped return minus a value). Linear, so costs give cost-to-go. ``mask`` and
    ``done`` cut episodes exactly as in :func:`gae` (padded steps get 0).

    Args:
      rewards: per-step rewards or costs, floating point, time along ``dim``.
      gamma: discount in [0, 1].
      dim: the time dimension.
      mask: optional bool tensor of the shape of ``rewards``: true at real steps.
      done: optional bool tensor of the shape of ``rewards``: true at an episode's last step.

    Returns:
      Returns, the shape and dtype of ``rewards``.

    Raises:
      TypeError: an input has a wrong type or dtype.
      ValueError: flags have the wrong shape, or ``gamma``/``dim`` is out of range.

    Example:
      >>> import torch, dicefn as dice
      >>> dice.returns(torch.tensor([1.0, 2.0, 4.0]), gamma=0.5)
      tensor([3., 4., 4.])
      >>> dice.returns(torch.tensor([1.0, 2.0, 4.0]), 0.5, done=torch.tensor([True, False, False]))
      tensor([1., 4., 4.])
    """
    checks.check_floating(rewards, "rewards")
    d = _check_dim(rewards, dim, "returns")
    gamma = _check_unit(gamma, "gamma", "returns", allow_tensor=False)
    mask = _check_flags(mask, "mask", rewards.shape, "returns")
    done = _check_flags(done, "done", rewards.shape, "returns")
    mv = lambda z: None if z is None else z.movedim(d, -1)  # noqa: E731
    return _advantages(mv(rewards), None, gamma, 1.0, mv(mask), mv(done)).movedim(-1, d)


__all__ = ["discounted_cumsum", "gae", "loaded_dice", "returns"]
