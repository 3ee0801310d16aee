"""dicefn.lm: alignment of log-probabilities with sampled tokens, masks, KL costs, the RLOO
surrogate, memory saved for backward, transforms, and interop with Hugging Face transformers."""

import math
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, hessian, vmap

import dicefn as dice
from grid import TRANSFORMS, assert_compiles_like_eager, saved_storages

F64 = torch.float64
PAD, EOS = 0, 1


# A tiny causal transformer, random init, with explicit attention mask and positions ----------


class TinyCausalLM(nn.Module):
    def __init__(self, vocab=7, dim=16, max_len=32):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.ln1, self.ln2, self.lnf = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask, position_ids):
        length = input_ids.shape[-1]
        x = self.tok(input_ids) + self.pos(position_ids)
        q, k, v = self.qkv(self.ln1(x)).chunk(3, -1)
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        future = torch.ones(length, length, dtype=torch.bool).triu(1)
        blocked = future | (attention_mask[:, None, :] == 0)
        blocked = blocked & ~torch.eye(length, dtype=torch.bool)  # a pad query sees itself
        x = x + self.proj(torch.softmax(s.masked_fill(blocked, -math.inf), -1) @ v)
        x = x + self.mlp(self.ln2(x))
        return self.head(self.lnf(x))


def _left_pad(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _generate(model, prompt_ids, prompt_mask, key, new_tokens):
    """Keyed sampling token by token; pads after EOS. Returns sequences and sampled logp."""
    ids, am = prompt_ids, prompt_mask
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    sampled = []
    for k in dice.random.split(key, new_tokens):
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        logits = model(ids, am, pos)[:, -1]
        logp, tok = dice.sample_categorical(logits, key=k)
        tok = torch.where(done, torch.full_like(tok, PAD), tok)
        sampled.append(torch.where(done, torch.zeros_like(logp), logp))
        done = done | (tok == EOS)
        ids = torch.cat([ids, tok[:, None]], 1)
        am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
    return ids, torch.stack(sampled, 1)


@pytest.fixture(scope="module")
def tiny_batch():
    torch.manual_seed(0)
    model = TinyCausalLM().eval()
    prompt_ids, prompt_mask = _left_pad([[3, 4], [5, 2, 6, 3, 4], [2, 2, 6]])
    seq, sampled_logp = _generate(model, prompt_ids, prompt_mask, dice.random.key(7), 9)
    return model, prompt_ids, prompt_mask, seq, sampled_logp


def test_completion_logp_matches_per_position_computation(tiny_batch):
    model, prompt_ids, prompt_mask, seq, sampled_logp = tiny_batch
    width = prompt_ids.shape[1]
    mask = dice.lm.completion_mask(seq, width, EOS)
    assert (seq[:, width:] == EOS).any(), "fixture should contain an early EOS"
    assert not mask.all(-1).any()
    inputs = dice.lm.model_inputs(seq, prompt_mask)
    logits = model(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"])
    logp = dice.lm.completion_logp(logits, seq, mask)
    assert logp.shape == seq.shape
    # manual: one forward pass per scored position, on that row's real tokens only
    for b in range(seq.shape[0]):
        start = int((prompt_mask[b] == 0).sum())
        for t in range(seq.shape[1]):
            if not mask[b, t]:
                assert logp[b, t] == 0
                continue
            prefix = seq[b : b + 1, start:t]
            n = prefix.shape[1]
            out = model(prefix, torch.ones(1, n, dtype=torch.int64), torch.arange(n)[None])
            expected = torch.log_softmax(out[0, -1], -1)[seq[b, t]]
            torch.testing.assert_close(logp[b, t], expected, atol=1e-5, rtol=1e-5)
    # the distributions scored are those sampled from, token for token
    torch.testing.assert_close(logp[:, width:], sampled_logp * mask[:, width:], atol=1e-5, rtol=1e-5)
    # logits with L - 1 positions (a forward pass over seq[:, :-1]) give the same result
    torch.testing.assert_close(dice.lm.completion_logp(logits[:, :-1], seq, mask), logp)


def test_completion_logp_gradient_is_zero_at_masked_positions(tiny_batch):
    model, prompt_ids, prompt_mask, seq, _ = tiny_batch
    mask = dice.lm.completion_mask(seq, prompt_ids.shape[1], EOS)
    inputs = dice.lm.model_inputs(seq, prompt_mask)
    logits = model(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]).detach()
    logits.requires_grad_()
    logp = dice.lm.completion_logp(logits, seq, mask)
    weights = torch.randn(logp.shape)
    for f in (dice.lm.completion_logp, lambda x, s, m: dice.lm.kl_cost(x, x.detach() * 0.5, m)):
        (g,) = torch.autograd.grad((f(logits, seq, mask) * weights).sum(), logits)
        scored = F.pad(mask[:, 1:], (0, 1))  # logits[:, t - 1] scores token t
        assert (g[~scored] == 0).all()
        assert (g[scored].abs().sum(-1) > 0).all()
    # parameters: masking a token is the same as giving it zero weight in the loss
    params = dict(model.named_parameters())
    args = (inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"])

    def loss(p, m, w):
        out = torch.func.functional_call(model, p, args)
        return (dice.lm.completion_logp(out, seq, m) * w).sum()

    b, t = 0, int(mask[0].float().argmax())
    dropped, zero_weight = mask.clone(), weights.clone()
    dropped[b, t], zero_weight[b, t] = False, 0.0
    g_full = grad(loss)(params, mask, weights)
    g_drop = grad(loss)(params, dropped, weights)
    g_zero = grad(loss)(params, mask, zero_weight)
    for name in params:
        torch.testing.assert_close(g_drop[name], g_zero[name])
    assert any((g_full[n] - g_drop[n]).abs().max() > 1e-6 for n in params)


def test_completion_mask_and_model_inputs():
    seq = torch.tensor([[0, 0, 5, 6, 1, 0, 0], [3, 1, 5, 7, 1, 2, 2], [9, 9, 9, 8, 8, 8, 8]])
    mask = dice.lm.completion_mask(seq, 3, eos_token_id=1)
    expected = torch.tensor([[0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    # an EOS inside the prompt does not end the completion; several EOS ids; no EOS
    assert torch.equal(dice.lm.completion_mask(seq, 3, [1, 7])[1], torch.tensor([0, 0, 0, 1, 0, 0, 0], dtype=torch.bool))
    assert torch.equal(dice.lm.completion_mask(seq, 3), (torch.arange(7) >= 3).expand(3, 7))
    inputs = dice.lm.model_inputs(seq, torch.tensor([[0, 0, 1], [1, 1, 1], [0, 1, 1]]))
    assert torch.equal(inputs["attention_mask"][0], torch.tensor([0, 0, 1, 1, 1, 1, 1]))
    assert torch.equal(inputs["position_ids"][2], torch.tensor([0, 0, 1, 2, 3, 4, 5]))
    assert inputs["input_ids"] is seq
    # vmap over rows equals the batch, and both compile without graph breaks
    torch.testing.assert_close(vmap(lambda s: dice.lm.completion_mask(s, 3, 1))(seq), mask)
    compiled = torch.compile(lambda s: dice.lm.completion_mask(s, 3, [1, 7]), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(seq), dice.lm.completion_mask(seq, 3, [1, 7]))
    pm = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]])
    compiled_inputs = torch.compile(dice.lm.model_inputs, fullgraph=True, backend="aot_eager")(seq, pm)
    for k, v in dice.lm.model_inputs(seq, pm).items():
        assert torch.equal(compiled_inputs[k], v)


def test_lm_bad_input():
    seq = torch.zeros(2, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"prompt_length must lie in \[1, L\] = \[1, 5\]"):
        dice.lm.completion_mask(seq, 0, 1)
    with pytest.raises(TypeError, match="sequences must be an integer tensor"):
        dice.lm.completion_mask(seq.float(), 2, 1)
    with pytest.raises(TypeError, match="eos_token_id"):
        dice.lm.completion_mask(seq, 2, [1.0])
    with pytest.raises(ValueError, match=r"does not fit sequences of shape \(2, 5\)"):
        dice.lm.model_inputs(seq, torch.ones(2, 6, dtype=torch.int64))
    logits = torch.zeros(2, 5, 4)
    with pytest.raises(ValueError, match="logits has 3 positions; input_ids has L = 5"):
        dice.lm.completion_logp(logits[:, :3], seq, seq > 0)
    with pytest.raises(ValueError, match=r"completion_mask must have the shape of input_ids \(2, 5\)"):
        dice.lm.completion_logp(logits, seq, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="completion_mask must be a bool"):
        dice.lm.completion_logp(logits, seq, torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"ref_logits must have the shape of logits \(2, 5, 4\)"):
        dice.lm.kl_cost(logits, torch.zeros(2, 5, 3), seq > 0)
    logp = torch.zeros(6, 5)
    with pytest.raises(ValueError, match="group_size must be >= 2 and divide N = 6, got 4"):
        dice.lm.rloo_surrogate(logp, torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match=r"cost must have shape \[N\] = \(6,\)"):
        dice.lm.rloo_surrogate(logp, torch.zeros(6, 1), group_size=3)
    with pytest.raises(ValueError, match="kl_coef must be a float >= 0"):
        dice.lm.rloo_surrogate(logp, torch.zeros(6), group_size=3, kl=logp, kl_coef=-1.0)


# KL cost and the RLOO surrogate ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_cost_matches_distributions(dtype):
    logits, ref = torch.randn(3, 6, 11, dtype=dtype) * 2, torch.randn(3, 6, 11, dtype=dtype) * 2
    mask = torch.rand(3, 6) < 0.7
    out = dice.lm.kl_cost(logits, ref, mask)
    kl = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=logits[:, :-1]), torch.distributions.Categorical(logits=ref[:, :-1])
    )
    expected = torch.where(mask, F.pad(kl, (1, 0)), torch.zeros(()))
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kl_cost_half_precision(dtype):
    logits32, ref32 = torch.randn(2, 5, 40) * 3, torch.randn(2, 5, 40) * 3
    mask = torch.ones(2, 5, dtype=torch.bool)
    logits = logits32.to(dtype).requires_grad_()
    ref = ref32.to(dtype)
    out = dice.lm.kl_cost(logits, ref, mask)
    assert out.dtype == torch.float32
    x = logits.detach().float().requires_grad_()
    expected = dice.lm.kl_cost(x, ref.float(), mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)  # float32 math on the same inputs
    w = torch.randn(2, 5)
    (g,) = torch.autograd.grad((out * w).sum(), logits, create_graph=True)
    (g_ref,) = torch.autograd.grad((expected * w).sum(), x, create_graph=True)
    assert g.dtype == dtype
    torch.testing.assert_close(g.float(), g_ref, atol=1e-2, rtol=1e-2)
    (g2,) = torch.autograd.grad(g.float().pow(2).sum(), logits)  # reverse over reverse works
    (g2_ref,) = torch.autograd.grad(g_ref.pow(2).sum(), x)
    torch.testing.assert_close(g2.float(), g2_ref, atol=5e-2, rtol=5e-2)


def test_rloo_surrogate_value_and_derivatives():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, 4, generator=gen, dtype=F64)
    ids = torch.randint(0, 4, (6, 5), generator=gen)
    mask = (torch.arange(5) >= 2).expand(6, 5)
    ref = torch.randn(6, 5, 4, generator=gen, dtype=F64)
    cost = torch.randn(6, generator=gen, dtype=F64)

    def surrogate(x):
        logp = dice.lm.completion_logp(x, ids, mask)
        kl = dice.lm.kl_cost(x, ref, mask)
        return dice.lm.rloo_surrogate(logp, cost, group_size=3, kl=kl, kl_coef=0.1)

    def manual(x):
        lp = torch.log_softmax(x, -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
        lq = torch.log_softmax(ref, -1)
        kl = (torch.softmax(x, -1) * (torch.log_softmax(x, -1) - lq)).sum(-1)[:, :-1] * mask[:, 1:]
        excl = lp.cumsum(-1) - lp
        total = (cost + 0.1 * kl.sum(-1)).detach().reshape(2, 3)
        loo = ((total.sum(1, keepdim=True) - total) / 2).reshape(6)
        seq = torch.exp(lp.sum(-1) - lp.sum(-1).detach())
        return seq * cost + 0.1 * (torch.exp(excl - excl.detach()) * kl).sum(-1) + (1 - seq) * loo

    forward = surrogate(logits)
    torch.testing.assert_close(forward, manual(logits))
    assert forward.shape == (6,)
    torch.testing.assert_close(hessian(lambda x: surrogate(x).sum())(logits), hessian(lambda x: manual(x).sum())(logits))


# Memory saved for backward ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_completion_logp_saves_no_extra_vocabulary_tensor(dtype):
    vocab, rows, length = 32000, 2, 6
    logits = torch.randn(rows, length, vocab, dtype=dtype, requires_grad=True)
    ids = torch.randint(0, vocab, (rows, length))
    mask = torch.ones(rows, length, dtype=torch.bool)
    one_row = vocab * logits.element_size()
    for fn in (lambda: dice.lm.completion_logp(logits, ids, mask),
               lambda: dice.logp_categorical(logits, ids)):
        sizes = saved_storages(fn)
        big = [s for s in sizes if s >= one_row]
        assert big == [logits.numel() * logits.element_size()], sizes  # the logits themselves
        assert sum(sizes) - big[0] <= 64 * rows * length  # per-token scalars only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_cost_saved_memory(dtype):
    vocab = 32000
    logits = torch.randn(2, 6, vocab, dtype=dtype, requires_grad=True)
    ref = torch.randn(2, 6, vocab, dtype=dtype)
    mask = torch.ones(2, 6, dtype=torch.bool)
    sizes = saved_storages(lambda: dice.lm.kl_cost(logits, ref, mask))
    big = sorted(s for s in sizes if s >= vocab * logits.element_size())
    inputs = logits.numel() * logits.element_size()
    if dtype == torch.bfloat16:  # only the two half-precision inputs
        assert big == [inputs, inputs], sizes
    else:  # the inputs and the policy's softmax
        softmax = logits[:, 1:].numel() * logits.element_size()  # scores positions 0 .. L - 2
        assert big == [softmax, inputs, inputs], sizes


# Transforms ------------------------------------------------------------------------------------

IDS = torch.tensor([[3, 0, 2, 1], [1, 1, 0, 2]])
MASK = torch.tensor([[False, False, True, True], [False, True, True, False]])
REF = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
COST = torch.tensor([1.0, -2.0], dtype=F64)


def _logits(t):  # [6] -> [2, 4, 3]
    rows = torch.stack([t[:3], t[3:], t[:3] * t[3:], t[:3] - t[3:]])
    return torch.stack([rows, rows.flip(0) * 0.5])


def _ref_logp(x):
    lp = torch.log_softmax(x, -1)[:, :-1].gather(-1, IDS[:, 1:, None])[..., 0]
    return F.pad(lp, (1, 0)) * MASK


def _ref_kl(x):
    lp, lq = torch.log_softmax(x, -1), torch.log_softmax(REF, -1)
    return F.pad((lp.exp() * (lp - lq)).sum(-1)[:, :-1], (1, 0)) * MASK


CASES = {
    "completion_logp": (
        lambda t: (dice.lm.completion_logp(_logits(t), IDS, MASK) ** 2).sum(),
        lambda t: (_ref_logp(_logits(t)) ** 2).sum(),
    ),
    "kl_cost": (
        lambda t: (dice.lm.kl_cost(_logits(t), REF, MASK) ** 2).sum(),
        lambda t: (_ref_kl(_logits(t)) ** 2).sum(),
    ),
    "rloo_surrogate": (
        lambda t: dice.lm.rloo_surrogate(
            dice.lm.completion_logp(_logits(t), IDS, MASK), COST * t[0], group_size=2,
            kl=dice.lm.kl_cost(_logits(t), REF, MASK), kl_coef=0.3).sum(),
        lambda t: (
            torch.exp(_ref_logp(_logits(t)).sum(-1) - _ref_logp(_logits(t)).sum(-1).detach()) * COST * t[0]
            + 0.3 * (torch.exp((_ref_logp(_logits(t)).cumsum(-1) - _ref_logp(_logits(t)))
                               - (_ref_logp(_logits(t)).cumsum(-1) - _ref_logp(_logits(t))).detach())
                     * _ref_kl(_logits(t))).sum(-1)
            + (1 - torch.exp(_ref_logp(_logits(t)).sum(-1) - _ref_logp(_logits(t)).sum(-1).detach()))
            * (COST * t[0] + 0.3 * _ref_kl(_logits(t)).sum(-1)).detach().flip(0)
        ).sum(),
    ),
}

@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("case", CASES)
def test_transform_matches_reference(case, transform):
    f, ref = CASES[case]
    torch.testing.assert_close(TRANSFORMS[transform](f), TRANSFORMS[transform](ref))


@pytest.mark.parametrize("case", CASES)
def test_compile_fullgraph(case):
    assert_compiles_like_eager(CASES[case][0])


# Hugging Face transformers interop ---------------------------------------------------------------


def test_transformers_generate_scores_match_completion_logp():
    """A GPT-2 built from a config (no download): sampling with top_k=0, the scores that
    generate reports for the sampled tokens are completion_logp of a forward pass."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=8, n_positions=64, n_embd=16, n_layer=2, n_head=2,
        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    prompt_ids, prompt_mask = _left_pad([[3, 4], [5, 2, 6, 3, 4], [2, 7, 6]])
    k = 2
    out = model.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, top_k=0, top_p=1.0,
        max_new_tokens=10, num_return_sequences=k, output_scores=True, output_logits=True,
        return_dict_in_generate=True,
    )
    seq, width = out.sequences, prompt_ids.shape[1]
    scores = torch.stack(out.scores, 1)  # [N, new, V], after logits processors
    torch.testing.assert_close(scores, torch.stack(out.logits, 1))  # top_k=0: nothing processed
    mask = dice.lm.completion_mask(seq, width, cfg.eos_token_id)
    assert (~mask[:, width:]).any(), "some completion should end early with EOS"
    reported = torch.log_softmax(scores, -1).gather(-1, seq[:, width:, None])[..., 0]
    pm = prompt_mask.repeat_interleave(k, 0)
    with torch.no_grad():
        logits = model(**dice.lm.model_inputs(seq, pm)).logits
        naive = model(seq, attention_mask=dice.lm.model_inputs(seq, pm)["attention_mask"]).logits
    logp = dice.lm.completion_logp(logits, seq, mask)
    scored = mask[:, width:]
    torch.testing.assert_close(logp[:, width:][scored], reported[scored], atol=1e-5, rtol=1e-5)
    assert (logp[:, :width] == 0).all() and (logp[:, width:][~scored] == 0).all()
    # the pitfall model_inputs avoids: without position_ids, left-padded rows are mis-scored
    naive_logp = dice.lm.completion_logp(naive, seq, mask)
    padded_rows = (pm == 0).any(-1)
    assert (naive_logp[padded_rows] - logp[padded_rows]).abs().max() > 1e-3
    torch.testing.assert_close(naive_logp[~padded_rows], logp[~padded_rows], atol=1e-5, rtol=1e-5)
    # and the RLOO loss over groups of k completions backpropagates into the model
    reward = (seq[:, width:] == 3).sum(-1).to(torch.float32)
    logits = model(**dice.lm.model_inputs(seq, pm)).logits
    loss = dice.lm.rloo_surrogate(dice.lm.completion_logp(logits, seq, mask), -reward, group_size=k).mean()
    loss.backward()
    assert model.transformer.wte.weight.grad.abs().sum() > 0


def _tiny_gpt2(transformers, seed):
    cfg = transformers.GPT2Config(
        vocab_size=8, n_positions=64, n_embd=16, n_layer=2, n_head=2,
        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_readme_rloo_recipe_runs_with_gpt2():
    """The README's ``rloo_loss`` on GPT-2 models built from a config: its forward value is
    the mean total cost, and it backpropagates into the policy only."""
    transformers = pytest.importorskip("transformers")
    readme = pathlib.Path(__file__).resolve().parent.parent / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    namespace = {"torch": torch, "dice": dice}
    exec(next(b for b in blocks if "def rloo_loss" in b), namespace)
    model, ref_model = _tiny_gpt2(transformers, 0), _tiny_gpt2(transformers, 1)
    ids, am = _left_pad([[3, 4], [5, 2, 6, 3, 4]])
    prompt = {"input_ids": ids, "attention_mask": am}

    def reward_fn(seq):
        return (seq[:, ids.shape[1]:] == 3).sum(-1).to(torch.float32)

    torch.manual_seed(5)
    loss = namespace["rloo_loss"](model, ref_model, prompt, reward_fn, k=3, kl_coef=0.1, max_new_tokens=6)
    loss.backward()
    assert model.transformer.wte.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in ref_model.parameters())
    # the same draw again, to check the forward value: mean of -reward + 0.1 * sum KL
    torch.manual_seed(5)
    with torch.no_grad():
        seq = model.generate(**prompt, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=6, num_return_sequences=3)
        inputs = dice.lm.model_inputs(seq, am.repeat_interleave(3, 0))
        mask = dice.lm.completion_mask(seq, ids.shape[1], EOS)
        kl = dice.lm.kl_cost(model(**inputs).logits, ref_model(**inputs).logits, mask)
    expected = (-reward_fn(seq) + 0.1 * kl.sum(-1)).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
