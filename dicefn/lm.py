"""Language models: per-token DiCE nodes and costs from ``model.generate`` output.

From sampled completions to a loss (see the README section "Language models")::

    import dicefn as dice
    out = model.generate(**prompt, do_sample=True, top_k=0, num_return_sequences=k)
    inputs = dice.lm.model_inputs(out, prompt["attention_mask"].repeat_interleave(k, 0))
    mask = dice.lm.completion_mask(out, prompt["input_ids"].shape[1], eos_token_id)
    logits = model(**inputs).logits
    logp = dice.lm.completion_logp(logits, out, mask)             # [N, L] nodes
    kl = dice.lm.kl_cost(logits, ref_model(**inputs).logits.detach(), mask)
    loss = dice.lm.rloo_surrogate(logp, -reward, group_size=k, kl=kl, kl_coef=0.05).mean()

Per-token outputs are aligned with the tokens: position ``t`` is scored by
``logits[..., t - 1, :]`` and position 0 is always 0.
"""

from dicefn._src.lm import (
    completion_logp,
    completion_mask,
    kl_cost,
    model_inputs,
    rloo_surrogate,
)

__all__ = [
    "completion_logp",
    "completion_mask",
    "kl_cost",
    "model_inputs",
    "rloo_surrogate",
]
