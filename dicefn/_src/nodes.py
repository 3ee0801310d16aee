"""Stochastic nodes: log-probabilities of sampled values, and samplers that return them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dicefn._src import checks, prng


def _check_key_or_none(key: object) -> None:
    if key is not None:
        prng.check_key(key)


class _HalfCategoricalLogp(torch.autograd.Function):
    """Categorical log-probabilities of half-precision logits, computed in float32.

    Saves only the (half-precision) logits and the actions for backward; the float32 softmax
    is recomputed there. The backward is built from differentiable ops, so reverse-mode
    derivatives of every order work. There is deliberately no ``jvp``: forward-mode through a
    custom function does not nest correctly, so it raises instead of returning wrong numbers.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        x = logits.float()
        return x.gather(-1, actions.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, actions = inputs
        ctx.save_for_backward(logits, actions)

    @staticmethod
    def backward(ctx, grad):
        logits, actions = ctx.saved_tensors
        p = torch.softmax(logits.float(), dim=-1)
        onehot = torch.zeros_like(p).scatter(-1, actions.unsqueeze(-1), 1.0)
        return (grad.unsqueeze(-1) * (onehot - p)).to(logits.dtype), None


def _check_categorical(logits: torch.Tensor, actions: torch.Tensor) -> None:
    checks.check_floating(logits, "logits")
    checks.check_integer(actions, "actions")
    if logits.ndim == 0:
        raise ValueError("logits must have a class dimension: shape [..., num_classes], got ().")
    if tuple(actions.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"actions must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got "
            f"{tuple(actions.shape)} (logits shape {tuple(logits.shape)})."
        )


def logp_categorical(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of categorical actions: a stochastic node.

    Computed as ``logits.gather(actions) - logsumexp(logits)``: for float32/float64 logits
    autograd saves only the logits themselves (no second vocabulary-sized tensor, unlike
    ``log_softmax`` then ``gather``). float16/bfloat16 logits are scored in float32 and the
    result is float32; only the half-precision logits are saved for backward. Half-precision
    logits support reverse-mode derivatives of every order but not forward mode
    (``jvp``/``jacfwd``/``hessian``); use float32 logits for those.

    Args:
      logits: unnormalised log-probabilities, shape ``[..., num_classes]``, floating point.
      actions: sampled class indices, shape ``[...]`` (``logits.shape[:-1]``), integer dtype.

    Returns:
      Log-probabilities, shape ``[...]``; dtype of ``logits`` (float32 for half precision).

    Raises:
      TypeError: ``logits`` is not floating point or ``actions`` is not an integer tensor.
      ValueError: ``actions.shape != logits.shape[:-1]``.

    Example:
      >>> import torch, dicefn as dice
      >>> logits = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
      >>> dice.logp_categorical(logits, torch.tensor([0, 1])).exp()
      tensor([0.5000, 0.7311])
    """
    _check_categorical(logits, actions)
    actions = actions.long()
    if logits.dtype in checks.HALF_DTYPES:
        return _HalfCategoricalLogp.apply(logits, actions)
    picked = logits.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sample_categorical(
    logits: torch.Tensor, *, key: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples categorical actions (Gumbel-max) and returns their stochastic node.

    Args:
      logits: unnormalised log-probabilities, shape ``[..., num_classes]``, floating point.
      key: a key from :mod:`dicefn.random` (shape ``(2,)``). With a key the draw is a pure
        function of it, so this can be called inside ``torch.func.hessian``/``jacrev``/
        ``jacfwd`` and vmapped over a stack of keys. With ``None`` it uses torch's global
        RNG: faster, but it cannot run inside ``hessian``/``jacfwd`` and needs
        ``vmap(..., randomness="different")``.

    Returns:
      ``(logp, actions)``: log-probabilities as in :func:`logp_categorical`, shape ``[...]``,
      and the sampled indices, shape ``[...]``, ``torch.int64``.

    Raises:
      TypeError: ``logits`` is not floating point, or ``key`` is not a key.
      ValueError: ``key`` does not have shape ``(2,)``.

    Example:
      >>> import torch, dicefn as dice
      >>> logp, actions = dice.sample_categorical(torch.zeros(5, 4), key=dice.random.key(0))
      >>> actions.shape, logp.shape
      (torch.Size([5]), torch.Size([5]))
    """
    checks.check_floating(logits, "logits")
    _check_key_or_none(key)
    if logits.ndim == 0:
        raise ValueError("logits must have a class dimension: shape [..., num_classes], got ().")
    x = logits.detach().to(checks.compute_dtype(logits))
    if key is None:
        g = -torch.log(-torch.log(torch.rand_like(x)))
    else:
        g = prng.gumbel(key.to(x.device), x.shape, dtype=x.dtype)
    actions = torch.argmax(x + g, dim=-1)
    return logp_categorical(logits, actions), actions


def logp_bernoulli(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of Bernoulli outcomes: a stochastic node.

    ``log p(value) = value * logits - softplus(logits)``, differentiable to every order.

    Args:
      logits: log-odds of a one, shape ``[...]``, floating point.
      value: outcomes in {0, 1}; bool, integer or floating dtype; shape broadcastable with
        ``logits``.

    Returns:
      Log-probabilities of the broadcast shape; dtype of ``logits`` (float32 for half).

    Raises:
      TypeError: ``logits`` is not floating point or ``value`` is not a tensor.
      ValueError: the shapes do not broadcast.
    """
    checks.check_floating(logits, "logits")
    checks.check_tensor(value, "value")
    checks.broadcast_shapes("logp_bernoulli", logits=logits.shape, value=value.shape)
    x = logits.to(checks.compute_dtype(logits))
    return value.detach().to(x.dtype) * x - F.softplus(x)


def sample_bernoulli(
    logits: torch.Tensor, *, key: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples Bernoulli outcomes and returns their stochastic node.

    Args:
      logits: log-odds of a one, shape ``[...]``, floating point.
      key: a key (see :func:`sample_categorical`), or ``None`` for torch's global RNG.

    Returns:
      ``(logp, value)``: log-probabilities, shape ``[...]``, and the outcomes as 0.0/1.0 in
      the dtype of ``logits``, shape ``[...]``.
    """
    checks.check_floating(logits, "logits")
    _check_key_or_none(key)
    x = logits.detach().to(checks.compute_dtype(logits))
    if key is None:
        u = torch.rand_like(x)
    else:
        u = prng.uniform(key.to(x.device), x.shape, dtype=x.dtype)
    value = (u < torch.sigmoid(x)).to(logits.dtype)
    return logp_bernoulli(logits, value), value


_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def logp_normal(loc: torch.Tensor, scale: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Log-densities of Normal samples: a score-function stochastic node.

    ``value`` is detached: derivatives reach ``loc`` and ``scale`` through the density only
    (the score function), never through the sample.

    Args:
      loc: means, floating point; broadcastable with ``scale`` and ``value``.
      scale: standard deviations (positive), floating point.
      value: samples, floating point.

    Returns:
      Log-densities of the broadcast shape.

    Raises:
      TypeError: an argument is not a floating-point tensor.
      ValueError: the shapes do not broadcast.
    """
    checks.check_floating(loc, "loc")
    checks.check_floating(scale, "scale")
    checks.check_floating(value, "value")
    checks.broadcast_shapes(
        "logp_normal", loc=loc.shape, scale=scale.shape, value=value.shape
    )
    z = (value.detach() - loc) / scale
    return -0.5 * z * z - torch.log(scale) - _HALF_LOG_2PI


def sample_normal(
    loc: torch.Tensor, scale: torch.Tensor, *, key: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples from a Normal and returns the score-function stochastic node.

    Args:
      loc: means, floating point.
      scale: standard deviations (positive), floating point, broadcastable with ``loc``.
      key: a key (see :func:`sample_categorical`), or ``None`` for torch's global RNG.

    Returns:
      ``(logp, value)``: log-densities and the detached samples, both of shape
      ``broadcast(loc.shape, scale.shape)``.
    """
    checks.check_floating(loc, "loc")
    checks.check_floating(scale, "scale")
    _check_key_or_none(key)
    shape = checks.broadcast_shapes("sample_normal", loc=loc.shape, scale=scale.shape)
    dtype = torch.promote_types(loc.dtype, scale.dtype)
    if key is None:
        eps = torch.randn(shape, dtype=dtype, device=loc.device)
    else:
        eps = prng.normal(key.to(loc.device), shape, dtype=dtype)
    value = (loc.detach() + scale.detach() * eps).detach()
    return logp_normal(loc, scale, value), value


def logp(dist: torch.distributions.Distribution, value: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of samples from any ``torch.distributions.Distribution``.

    ``value`` is detached, making this a score-function node whatever produced the sample.
    Under ``torch.func`` transforms build the distribution with ``validate_args=False``:
    argument validation branches on tensor values.

    Args:
      dist: the distribution the sample was drawn from.
      value: the sample, shape ``sample_shape + dist.batch_shape + dist.event_shape``.

    Returns:
      ``dist.log_prob(value.detach())``, shape ``sample_shape + dist.batch_shape``.

    Raises:
      TypeError: ``dist`` is not a Distribution or ``value`` is not a tensor.
    """
    if not isinstance(dist, torch.distributions.Distribution):
        raise TypeError(
            f"dist must be a torch.distributions.Distribution, got {type(dist).__name__}."
        )
    checks.check_tensor(value, "value")
    return dist.log_prob(value.detach())
