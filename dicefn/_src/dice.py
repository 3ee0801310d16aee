"""The DiCE operator, cost nodes and baseline terms."""

from __future__ import annotations

from typing import Any

import optree
import torch

from dicefn._src import checks

# A pytree of stochastic-node tensors: a tensor, or any nesting of lists, tuples, dicts and
# NamedTuples of them (flattened with optree; ``None`` entries are skipped).
Nodes = Any


def magic_box(tau: torch.Tensor) -> torch.Tensor:
    """The DiCE "magic box" operator, ``exp(tau - tau.detach())``.

    Its forward value is exactly one; its derivative is ``magic_box(tau) * d tau``, so every
    derivative of ``magic_box(tau) * cost`` carries the score-function terms of ``tau`` to
    any order.

    Args:
      tau: sum of log-probabilities of sampled values; any shape, floating point.

    Returns:
      A tensor of ones with the shape, dtype and device of ``tau``.

    Raises:
      TypeError: if ``tau`` is not a floating-point tensor.

    Example:
      >>> import torch, dicefn as dice
      >>> dice.magic_box(torch.tensor([0.3, -2.0]))
      tensor([1., 1.])

    References:
      Foerster et al., "DiCE: The Infinitely Differentiable Monte Carlo Estimator",
      ICML 2018, arXiv:1802.05098.
    """
    checks.check_floating(tau, "tau")
    return torch.exp(tau - tau.detach())


def _reduce_node(node: torch.Tensor, shape: torch.Size, i: int, what: str) -> torch.Tensor:
    """Sums ``node`` to a tensor broadcastable to ``shape``, aligning leading dimensions.

    Trailing dimensions beyond ``len(shape)`` are summed; a leading dimension where ``shape``
    has size 1 is summed (keeping it); a leading dimension where ``node`` has size 1 is
    broadcast. A node with fewer dimensions than ``shape`` applies to every entry of the
    missing trailing dimensions.
    """
    k = len(shape)
    if node.ndim > k:
        node = node.sum(dim=tuple(range(k, node.ndim)))
    keep = []
    for d, (n, c) in enumerate(zip(node.shape, shape)):
        if n == c or n == 1:
            continue
        if c == 1:
            keep.append(d)
            continue
        raise ValueError(
            f"{what}: node {i} of shape {tuple(node.shape)} (after summing trailing dims) does "
            f"not align with shape {tuple(shape)} at dim {d} ({n} vs {c}). Leading dims must be "
            "equal, or 1 in the cost (summed over) or 1 in the node (broadcast)."
        )
    if keep:
        node = node.sum(dim=keep, keepdim=True)
    if node.ndim < k:
        node = node.reshape(tuple(node.shape) + (1,) * (k - node.ndim))
    return node


def node_sum(nodes: Nodes, shape: torch.Size, what: str = "cost_node") -> torch.Tensor | None:
    """``tau``: the sum of every node in ``nodes``, each reduced to broadcast to ``shape``.

    Returns ``None`` when ``nodes`` has no leaves.
    """
    leaves = optree.tree_leaves(nodes)
    tau = None
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{what}: node {i} is a {type(leaf).__name__}; nodes must be tensors of "
                "log-probabilities (e.g. from dicefn.logp_categorical)."
            )
        if not leaf.is_floating_point():
            raise TypeError(
                f"{what}: node {i} has dtype {leaf.dtype}; nodes are floating-point "
                "log-probabilities, not the sampled values themselves."
            )
        r = _reduce_node(leaf, shape, i, what)
        tau = r if tau is None else tau + r
    return tau


def cost_node(cost: torch.Tensor, nodes: Nodes) -> torch.Tensor:
    """DiCE surrogate of a cost: ``magic_box(tau) * cost``.

    ``tau`` is the sum of the stochastic nodes that causally influence ``cost``. The forward
    value equals ``cost``; the n-th derivative is an unbiased estimate of the n-th derivative
    of ``E[cost]`` for every n. Listing a node that does not influence the cost adds variance
    but no bias; leaving out one that does biases the estimate.

    Nodes are aligned with ``cost`` from the left: a node of shape ``[B, T]`` with a cost of
    shape ``[B]`` is summed over ``T`` (one cost per batch item, influenced by all of its
    ``T`` nodes); a dimension of size 1 in ``cost`` is summed over in the node; a dimension
    of size 1 in the node (or a missing trailing one) is broadcast over the cost.

    Args:
      cost: costs, shape ``[*S]``, floating point. Any function of the samples and of the
        parameters (pathwise derivatives flow through it as usual).
      nodes: a pytree (tensor, list, tuple, dict, nested) of log-probability tensors, each of
        shape ``[*S', *E]`` where ``S'`` aligns with ``S`` as described above and ``E`` is
        summed.

    Returns:
      Surrogate costs of shape ``[*S]``, equal to ``cost`` in the forward pass.

    Raises:
      TypeError: ``cost`` or a node is not a floating-point tensor.
      ValueError: a node's leading shape does not align with ``cost.shape``.

    Example:
      >>> import torch, dicefn as dice
      >>> logits = torch.zeros(4, 3, requires_grad=True)
      >>> logp, actions = dice.sample_categorical(logits, key=dice.random.key(0))
      >>> cost = (actions == 2).to(logits.dtype)
      >>> surrogate = dice.cost_node(cost, [logp])
      >>> torch.equal(surrogate, cost)
      True

    References:
      Foerster et al., ICML 2018, arXiv:1802.05098.
    """
    checks.check_floating(cost, "cost")
    tau = node_sum(nodes, cost.shape, "cost_node")
    if tau is None:
        return cost
    return magic_box(tau) * cost


def baseline_term(baseline: torch.Tensor, nodes: Nodes) -> torch.Tensor:
    """DiCE baseline term with baseline subtraction at every order of derivative.

    Returns ``(1 - magic_box(tau)) * baseline``, with ``tau`` the sum of ``nodes`` reduced as
    in :func:`cost_node`. It is zero in the forward pass, and
    ``cost_node(c, W) + baseline_term(b, W)`` has the derivatives of
    ``magic_box(W) * (c - b)`` at every order: the baseline is subtracted from the cost
    in the gradient, the Hessian and beyond (Mao et al. 2019, telescoped over the nodes).

    dice-mc's ``baseline_term`` adds one ``(1 - magic_box(w)) * b`` per node ``w``. With a
    single node the two agree; with several nodes dice-mc's form subtracts the baseline from
    the first derivative only, and its second derivative keeps cross terms of ``b``, so it
    does not reduce (and can increase) the variance of Hessians.

    The baseline must not depend on the samples of ``nodes`` (or their descendants); any
    such quantity keeps every derivative unbiased. Pass it detached unless you mean the
    baseline's own parameters to receive (zero-mean) higher-order terms.

    Args:
      baseline: baseline values, shape ``[*S]`` (usually that of the cost), floating point.
      nodes: the pytree of log-probability tensors passed to :func:`cost_node`.

    Returns:
      Zeros of shape ``[*S]`` whose derivatives are those of baseline subtraction.

    Raises:
      TypeError: ``baseline`` or a node is not a floating-point tensor.
      ValueError: a node's leading shape does not align with ``baseline.shape``.

    Example:
      >>> import torch, dicefn as dice
      >>> logits = torch.zeros(8, 3, requires_grad=True)
      >>> logp, actions = dice.sample_categorical(logits, key=dice.random.key(1))
      >>> cost = actions.to(logits.dtype) + 10.0
      >>> loss = dice.cost_node(cost, logp) + dice.baseline_term(torch.full((8,), 11.0), logp)
      >>> torch.equal(loss, cost)
      True

    References:
      Mao et al., "A Baseline for Any Order Gradient Estimation in Stochastic Computation
      Graphs", ICML 2019.
    """
    checks.check_floating(baseline, "baseline")
    tau = node_sum(nodes, baseline.shape, "baseline_term")
    if tau is None:
        return torch.zeros_like(baseline)
    return (1.0 - magic_box(tau)) * baseline


def batch_baseline_term(cost: torch.Tensor, nodes: Nodes, dim: int = 0) -> torch.Tensor:
    """Leave-one-out baseline term: each cost's baseline is the mean of the others.

    Along ``dim``, the baseline of entry ``i`` is ``(sum_j cost_j - cost_i) / (n - 1)``,
    detached, applied with :func:`baseline_term` (so it subtracts at every order). It is
    unbiased when the entries along ``dim`` are independent samples and each entry's nodes
    belong to that entry only. Use ``dim=0`` for a batch of independent samples and
    ``dim=1`` for costs of shape ``[num_prompts, samples_per_prompt]`` (one group per
    prompt, as in RLOO).

    Args:
      cost: costs, shape ``[*S]`` with ``S[dim] >= 2``, floating point.
      nodes: the pytree of log-probability tensors passed to :func:`cost_node`.
      dim: the dimension along which entries are independent samples.

    Returns:
      Zeros of shape ``[*S]`` with the derivatives of leave-one-out baseline subtraction.

    Raises:
      ValueError: ``cost`` has fewer than two entries along ``dim``, or ``dim`` is out of
        range, or a node does not align with ``cost.shape``.

    Example:
      >>> import torch, dicefn as dice
      >>> logits = torch.zeros(16, 3, requires_grad=True)
      >>> logp, actions = dice.sample_categorical(logits, key=dice.random.key(2))
      >>> cost = actions.to(logits.dtype)
      >>> loss = (dice.cost_node(cost, logp) + dice.batch_baseline_term(cost, logp)).mean()
      >>> loss.backward()

    References:
      Kool, van Hoof and Welling, "Buy 4 REINFORCE Samples, Get a Baseline for Free!",
      ICLR workshop 2019.
    """
    checks.check_floating(cost, "cost")
    if cost.ndim == 0:
        raise ValueError("batch_baseline_term: cost is a scalar; it needs a batch dimension.")
    if not -cost.ndim <= dim < cost.ndim:
        raise ValueError(
            f"batch_baseline_term: dim {dim} is out of range for cost of shape "
            f"{tuple(cost.shape)}."
        )
    n = cost.shape[dim]
    if n < 2:
        raise ValueError(
            f"batch_baseline_term: needs at least 2 samples along dim {dim}, got cost of "
            f"shape {tuple(cost.shape)}."
        )
    c = cost.detach()
    baseline = (c.sum(dim=dim, keepdim=True) - c) / (n - 1)
    return baseline_term(baseline, nodes)
