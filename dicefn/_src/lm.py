"""Language models: from ``generate`` output to DiCE costs and a group-baselined loss.

Conventions shared by every function here: ``sequences``/``input_ids`` have shape
``[..., L]`` (prompt then completion, as ``model.generate`` returns them); per-token outputs
have the same shape ``[..., L]`` and are aligned with the tokens, so position ``t`` holds
the quantity of token ``t``, scored by ``logits[..., t - 1, :]`` (position 0 has no logits
and is always 0). ``logits`` may have ``L`` positions (a forward pass over the full
sequence; the last is unused) or ``L - 1`` (a pass over ``sequences[..., :-1]``).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F

from dicefn._src import checks
from dicefn._src.dice import batch_baseline_term, cost_node
from dicefn._src.nodes import logp_categorical

TokenIds = Union[int, Sequence[int]]


def _check_tokens(ids: torch.Tensor, name: str) -> None:
    checks.check_integer(ids, name)
    if ids.ndim == 0:
        raise ValueError(f"{name} must have a sequence dimension: shape [..., L], got ().")


def _check_mask(mask: torch.Tensor, shape: torch.Size | None, what: str) -> torch.Tensor:
    """A bool view of ``mask`` (bool or 0/1 integer), of shape ``shape`` if given."""
    checks.check_tensor(mask, "completion_mask")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(
            f"{what}: completion_mask must be a bool (or 0/1 integer) tensor, got dtype "
            f"{mask.dtype}."
        )
    if shape is None:
        if mask.ndim == 0:
            raise ValueError(f"{what}: completion_mask must have shape [..., L], got ().")
    elif tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"{what}: completion_mask must have the shape of input_ids {tuple(shape)}, got "
            f"{tuple(mask.shape)}."
        )
    return mask != 0


def _aligned_logits(
    logits: torch.Tensor, shape: torch.Size, what: str, name: str = "logits"
) -> torch.Tensor:
    """``logits[..., t - 1, :]`` for ``t = 1 .. L - 1``, shape ``[..., L - 1, V]`` (a view),
    for tokens of shape ``shape = [..., L]``."""
    checks.check_floating(logits, name)
    length = shape[-1]
    if logits.ndim != len(shape) + 1 or tuple(logits.shape[:-2]) != tuple(shape[:-1]):
        raise ValueError(
            f"{what}: {name} must have shape [..., L, vocab] (or [..., L - 1, vocab]) for "
            f"tokens of shape [..., L] = {tuple(shape)}, got {tuple(logits.shape)}."
        )
    if logits.shape[-2] == length:
        return logits[..., :-1, :]
    if logits.shape[-2] == length - 1:
        return logits
    raise ValueError(
        f"{what}: {name} has {logits.shape[-2]} positions; input_ids has L = {length}, so "
        f"{name} needs L or L - 1 positions ({name}[..., t - 1, :] scores input_ids[..., t])."
    )


def completion_mask(
    sequences: torch.Tensor, prompt_length: int, eos_token_id: TokenIds | None = None
) -> torch.Tensor:
    """Marks the sampled tokens of ``generate`` output: after the prompt, up to the first EOS.

    ``model.generate`` returns ``[prompt (left-padded to a common width), completion]`` and
    fills a completion that ended early with padding after its EOS token. The mask is true
    at completion positions ``t >= prompt_length`` up to and including the first EOS token
    (the EOS was sampled too, so it is scored); false on the prompt, its padding, and
    everything after the first EOS. Works when the pad token equals the EOS token.

    Args:
      sequences: token ids, shape ``[..., L]``, integer dtype.
      prompt_length: width of the (left-padded) prompt batch passed to ``generate``, i.e.
        ``prompt_ids.shape[-1]``; ``1 <= prompt_length <= L``.
      eos_token_id: an EOS id or a list of them; ``None`` if the completions never stop.

    Returns:
      A bool tensor of shape ``[..., L]``.

    Raises:
      TypeError: ``sequences`` is not an integer tensor, or the ids are not ints.
      ValueError: ``prompt_length`` is out of range.

    Example:
      >>> import torch, dicefn as dice
      >>> seq = torch.tensor([[0, 5, 7, 8, 2, 0], [4, 5, 7, 2, 9, 2]])  # prompt width 2, EOS 2
      >>> dice.lm.completion_mask(seq, prompt_length=2, eos_token_id=2).int()
      tensor([[0, 0, 1, 1, 1, 0],
              [0, 0, 1, 1, 0, 0]], dtype=torch.int32)
    """
    _check_tokens(sequences, "sequences")
    length = sequences.shape[-1]
    if isinstance(prompt_length, bool) or not isinstance(prompt_length, int):
        raise TypeError(f"prompt_length must be an int, got {type(prompt_length).__name__}.")
    if not 1 <= prompt_length <= length:
        raise ValueError(
            f"prompt_length must lie in [1, L] = [1, {length}] (position 0 has no logits), "
            f"got {prompt_length}."
        )
    positions = torch.arange(length, device=sequences.device)
    generated = (positions >= prompt_length).expand(sequences.shape)
    if eos_token_id is None:
        return generated.clone()
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise TypeError(
            f"eos_token_id must be an int or a non-empty list of ints, got {eos_token_id!r}."
        )
    eos_ids = torch.tensor(ids, dtype=sequences.dtype, device=sequences.device)
    is_eos = (sequences.unsqueeze(-1) == eos_ids).any(-1) & generated
    eos_before = torch.cumsum(is_eos.to(torch.int64), dim=-1) - is_eos.to(torch.int64)
    return generated & (eos_before == 0)


def model_inputs(sequences: torch.Tensor, prompt_attention_mask: torch.Tensor) -> dict:
    """Forward-pass inputs that reproduce the distributions ``generate`` sampled from.

    With left-padded prompts, ``generate`` counts positions from each row's first real
    token (``position_ids = attention_mask.cumsum(-1) - 1``). A plain ``model(sequences,
    attention_mask=...)`` does not do this for every architecture (GPT-2 in transformers 5
    numbers positions from the left edge), so the padded rows would be scored under other
    distributions than they were sampled from. Use ``model(**model_inputs(...))``.

    Args:
      sequences: ``generate`` output, shape ``[B, L]``, integer dtype.
      prompt_attention_mask: the prompt batch's attention mask, shape ``[B, P]`` with
        ``P <= L`` (1 at real tokens, 0 at left padding).

    Returns:
      ``{"input_ids": sequences, "attention_mask": [B, L], "position_ids": [B, L]}``; the
      completion part of the attention mask is all ones, as in ``generate``.

    Raises:
      TypeError: an input is not an integer or bool tensor.
      ValueError: the shapes do not match.

    Example:
      >>> import torch, dicefn as dice
      >>> seq = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
      >>> inputs = dice.lm.model_inputs(seq, torch.tensor([[0, 0, 1], [1, 1, 1]]))
      >>> inputs["position_ids"]
      tensor([[0, 0, 0, 1, 2],
              [0, 1, 2, 3, 4]])
    """
    _check_tokens(sequences, "sequences")
    checks.check_tensor(prompt_attention_mask, "prompt_attention_mask")
    if prompt_attention_mask.is_floating_point() or prompt_attention_mask.is_complex():
        raise TypeError(
            "prompt_attention_mask must be an integer or bool tensor, got "
            f"{prompt_attention_mask.dtype}."
        )
    if (
        prompt_attention_mask.ndim != sequences.ndim
        or tuple(prompt_attention_mask.shape[:-1]) != tuple(sequences.shape[:-1])
        or prompt_attention_mask.shape[-1] > sequences.shape[-1]
    ):
        raise ValueError(
            f"prompt_attention_mask of shape {tuple(prompt_attention_mask.shape)} does not fit "
            f"sequences of shape {tuple(sequences.shape)}: expected [..., P] with P <= L."
        )
    prompt = prompt_attention_mask.to(torch.int64)
    extra = sequences.shape[-1] - prompt.shape[-1]
    attention_mask = F.pad(prompt, (0, extra), value=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": sequences, "attention_mask": attention_mask, "position_ids": position_ids}


def completion_logp(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """Per-token log-probabilities of the sampled completion tokens: the stochastic nodes.

    Position ``t`` holds ``log softmax(logits[..., t - 1, :])[input_ids[..., t]]`` where
    ``completion_mask`` is true and 0 elsewhere (prompt, left padding, padding after EOS),
    with zero gradient there. Uses :func:`dicefn.logp_categorical`, so autograd saves only
    the logits themselves (no second vocabulary-sized tensor); float16/bfloat16 logits are
    scored in float32 (the result is float32) without saving a float32 copy.

    The logits must give the distribution the tokens were sampled from: sample with
    ``top_k=0`` (transformers' default is 50), ``top_p=1.0``, no repetition penalty, and
    divide the logits by the sampling temperature; the model in eval mode (no dropout);
    for left-padded prompts use :func:`model_inputs` for the forward pass.

    Logits at unscored positions must still be finite: their gradient is zero times the
    softmax, which is NaN for NaN logits.

    The nodes of a cost at token ``t`` are ``logp[..., :t + 1]``:
    ``cost_node(per_token_cost, discounted_cumsum(logp, 1.0))``; a cost of the whole
    sequence takes ``logp`` itself (summed over ``L`` by :func:`dicefn.cost_node`).

    Args:
      logits: next-token logits, shape ``[..., L, V]`` (or ``[..., L - 1, V]``), floating.
      input_ids: token ids, shape ``[..., L]``, integer dtype.
      completion_mask: bool (or 0/1 integer) tensor of shape ``[..., L]``, true at sampled
        tokens (e.g. from :func:`completion_mask`); position 0 is never scored.

    Returns:
      Log-probabilities, shape ``[..., L]``; dtype of ``logits`` (float32 for half).

    Raises:
      TypeError: a dtype is wrong.
      ValueError: the shapes do not line up.

    Example:
      >>> import torch, dicefn as dice
      >>> ids = torch.tensor([[3, 1, 2]])
      >>> logits = torch.zeros(1, 3, 4)                       # uniform over 4 tokens
      >>> dice.lm.completion_logp(logits, ids, torch.tensor([[False, True, True]])).exp()
      tensor([[1.0000, 0.2500, 0.2500]])
    """
    _check_tokens(input_ids, "input_ids")
    aligned = _aligned_logits(logits, input_ids.shape, "completion_logp")
    mask = _check_mask(completion_mask, input_ids.shape, "completion_logp")
    logp = F.pad(logp_categorical(aligned, input_ids[..., 1:]), (1, 0))
    return torch.where(mask, logp, torch.zeros_like(logp))


class _HalfKL(torch.autograd.Function):
    """KL(softmax(x) || softmax(y)) over the last dim for half-precision logits, in float32.

    Saves only the two (half-precision) inputs; the float32 softmaxes are recomputed in
    backward, which is built from differentiable ops (reverse mode of every order). No
    ``jvp``: forward mode raises, as for ``logp_categorical``'s half-precision path.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
        return _kl(logits.float(), ref_logits.float())

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        logits, ref_logits = ctx.saved_tensors
        x, y = logits.float(), ref_logits.float()
        lp, lq = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
        p, q = lp.exp(), lq.exp()
        kl = (p * (lp - lq)).sum(-1, keepdim=True)
        g = grad.unsqueeze(-1)
        return (g * p * (lp - lq - kl)).to(logits.dtype), (g * (q - p)).to(ref_logits.dtype)


def _kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # sum_v p_v (x_v - y_v) - lse(x) + lse(y): autograd saves softmax(x) and the inputs.
    p = torch.softmax(x, dim=-1)
    return (p * x).sum(-1) - (p * y).sum(-1) - torch.logsumexp(x, -1) + torch.logsumexp(y, -1)


def kl_cost(
    logits: torch.Tensor, ref_logits: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """Per-token KL(policy || reference) over the vocabulary: a cost with a pathwise gradient.

    Position ``t`` holds ``KL(softmax(logits[..., t-1, :]) || softmax(ref_logits[..., t-1,
    :]))``, the exact KL of the distribution that sampled token ``t``, where
    ``completion_mask`` is true, and 0 elsewhere (zero gradient there). It depends on the
    parameters directly and on the tokens before ``t``, so its DiCE nodes are the prefix
    ``logp[..., :t]``: ``cost_node(kl, discounted_cumsum(logp, 1.0) - logp)``. The
    inclusive prefix ``discounted_cumsum(logp, 1.0)`` is also unbiased (token ``t`` does
    not change the KL; it only adds variance).

    Memory: float32/float64 logits save the policy's softmax (one vocabulary-sized tensor)
    besides the inputs; float16/bfloat16 logits are computed in float32 and save only the
    inputs (reverse mode only, as for :func:`dicefn.logp_categorical`).

    Args:
      logits: policy logits, shape ``[..., L, V]`` (or ``[..., L - 1, V]``), floating.
      ref_logits: reference-model logits, the shape of ``logits``, usually detached.
      completion_mask: bool tensor of shape ``[..., L]`` (see :func:`completion_logp`).

    Returns:
      Per-token KL, shape ``[..., L]``; dtype of ``logits`` (float32 for half).

    Raises:
      TypeError: a dtype is wrong.
      ValueError: the shapes do not line up.

    Example:
      >>> import torch, dicefn as dice
      >>> ids = torch.tensor([[3, 1, 2]])
      >>> mask = torch.tensor([[False, True, True]])
      >>> logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [9.0, 9.0]]])
      >>> ref = torch.tensor([[[0.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])
      >>> dice.lm.kl_cost(logits, ref, mask)
      tensor([[0.0000, 0.0000, 0.4338]])
    """
    mask = _check_mask(completion_mask, None, "kl_cost")
    checks.check_floating(logits, "logits")
    checks.check_floating(ref_logits, "ref_logits")
    if tuple(logits.shape) != tuple(ref_logits.shape):
        raise ValueError(
            f"kl_cost: ref_logits must have the shape of logits {tuple(logits.shape)}, got "
            f"{tuple(ref_logits.shape)}."
        )
    x = _aligned_logits(logits, mask.shape, "kl_cost")
    y = _aligned_logits(ref_logits, mask.shape, "kl_cost", "ref_logits")
    if logits.dtype in checks.HALF_DTYPES or ref_logits.dtype in checks.HALF_DTYPES:
        kl = _HalfKL.apply(x, y)
    else:
        dtype = torch.promote_types(x.dtype, y.dtype)
        kl = _kl(x.to(dtype), y.to(dtype))
    kl = F.pad(kl, (1, 0))
    return torch.where(mask, kl, torch.zeros_like(kl))


def rloo_surrogate(
    logp: torch.Tensor,
    cost: torch.Tensor,
    *,
    group_size: int,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """DiCE loss of sampled completions with a leave-one-out baseline per prompt group.

    For ``N = num_prompts * group_size`` completions, grouped consecutively as
    ``generate(..., num_return_sequences=group_size)`` returns them, builds per sequence

        cost_node(cost, logp)                                   # sequence-level cost
        + kl_coef * cost_node(kl, prefix(logp)).sum(-1)         # per-token KL, causal
        + batch_baseline_term(total, logp, dim=1)               # leave-one-out per group

    where ``prefix(logp)`` is the exclusive prefix sum (the KL at token ``t`` depends on
    tokens ``< t``) and ``total = cost + kl_coef * kl.sum(-1)`` (detached for the
    baseline). The forward value is ``total``; minimise the mean. Every derivative is an
    unbiased estimate (any order) of that of the expected total, with the group's
    leave-one-out mean subtracted at every order (RLOO, Kool et al. 2019). Costs are
    minimised: pass ``cost = -reward``.

    Args:
      logp: per-token log-probabilities from :func:`completion_logp`, shape ``[N, L]``
        (zero outside the completion).
      cost: sequence-level costs, shape ``[N]``, e.g. ``-reward_model_score``.
      group_size: completions per prompt (``>= 2``); ``N`` must be a multiple of it.
      kl: optional per-token KL costs from :func:`kl_cost`, shape ``[N, L]``.
      kl_coef: the KL weight (``>= 0``).

    Returns:
      Surrogate costs, shape ``[N]``, equal to ``total`` in the forward pass.

    Raises:
      TypeError: an input is not a floating-point tensor, or ``group_size`` is not an int.
      ValueError: shapes do not match, ``N`` is not a multiple of ``group_size``,
        ``group_size < 2`` or ``kl_coef < 0``.

    Example:
      >>> import torch, dicefn as dice
      >>> logits = torch.zeros(4, 3, 5, requires_grad=True)   # 2 prompts x 2 samples
      >>> ids = torch.tensor([[1, 2, 3], [1, 0, 4], [2, 2, 2], [2, 1, 0]])
      >>> mask = torch.tensor([[False, True, True]]).expand(4, 3)
      >>> logp = dice.lm.completion_logp(logits, ids, mask)
      >>> reward = torch.tensor([1.0, 0.0, 0.5, 0.25])
      >>> loss = dice.lm.rloo_surrogate(logp, -reward, group_size=2).mean()
      >>> loss.backward()

    References:
      Kool, van Hoof and Welling, "Buy 4 REINFORCE Samples, Get a Baseline for Free!",
      2019. Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for
      Learning from Human Feedback in LLMs", ACL 2024, arXiv:2402.14740.
    """
    checks.check_floating(logp, "logp")
    checks.check_floating(cost, "cost")
    if logp.ndim != 2:
        raise ValueError(f"rloo_surrogate: logp must have shape [N, L], got {tuple(logp.shape)}.")
    n, length = logp.shape
    if tuple(cost.shape) != (n,):
        raise ValueError(
            f"rloo_surrogate: cost must have shape [N] = ({n},) for logp of shape "
            f"{tuple(logp.shape)}, got {tuple(cost.shape)}."
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(
            f"rloo_surrogate: group_size must be an int, got {type(group_size).__name__}."
        )
    if group_size < 2 or n % group_size:
        raise ValueError(
            f"rloo_surrogate: group_size must be >= 2 and divide N = {n}, got {group_size}."
        )
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)) or not kl_coef >= 0:
        raise ValueError(f"rloo_surrogate: kl_coef must be a float >= 0, got {kl_coef!r}.")
    surrogate = cost_node(cost, logp)
    total = cost
    if kl is not None:
        checks.check_floating(kl, "kl")
        if tuple(kl.shape) != tuple(logp.shape):
            raise ValueError(
                f"rloo_surrogate: kl must have the shape of logp {tuple(logp.shape)}, got "
                f"{tuple(kl.shape)}."
            )
        prefix = torch.cumsum(logp, dim=-1) - logp
        surrogate = surrogate + kl_coef * cost_node(kl, prefix).sum(-1)
        total = total + kl_coef * kl.sum(-1)
    groups = n // group_size
    baseline = batch_baseline_term(
        total.reshape(groups, group_size), logp.reshape(groups, group_size, length), dim=1
    )
    return surrogate + baseline.reshape(n)
