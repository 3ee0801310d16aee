"""Speed and memory benchmarks (items 2-7): overhead, per-example, Hessian, sampling,
memory saved for backward, compile."""

from __future__ import annotations

import math
import statistics
import time

import dice_mc.torch as dmc
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, vmap

import dicefn as dice
from benchmarks.harness import Bar, Config, Section, compare, md_table


def _key(seed: int, cfg: Config) -> torch.Tensor:
    return dice.random.key(seed).to(cfg.dev)


def _mlp(obs_dim: int, hidden: int, actions: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(obs_dim, hidden), nn.Tanh(),
        nn.Linear(hidden, hidden), nn.Tanh(),
        nn.Linear(hidden, actions),
    )


# 2. Overhead of a policy-gradient training step ---------------------------------------------


def overhead(cfg: Config) -> Section:
    """One REINFORCE step with a leave-one-out baseline, written three ways."""
    batch, obs_dim, hidden, n_actions = 8192, 32, 64, 16
    rounds = cfg.pick(600, 30)
    dev = cfg.dev
    gen = torch.Generator().manual_seed(cfg.seed)
    obs = torch.randn(batch, obs_dim, generator=gen).to(dev)
    goal = torch.randint(0, n_actions, (batch,), generator=gen).to(dev, torch.float32)

    def setup():
        torch.manual_seed(cfg.seed)
        net = _mlp(obs_dim, hidden, n_actions).to(dev)
        return net, torch.optim.Adam(net.parameters(), lr=1e-3)

    nets = {name: setup() for name in ("hand", "dicefn", "dice-mc")}

    def hand():
        net, opt = nets["hand"]
        logits = net(obs)
        gumbel = -torch.log(-torch.log(torch.rand_like(logits)))
        actions = torch.argmax(logits.detach() + gumbel, dim=-1)
        logp = torch.log_softmax(logits, -1).gather(-1, actions[:, None]).squeeze(-1)
        cost = (actions - goal) ** 2
        loss = (logp * (cost - cost.mean())).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def ours():
        net, opt = nets["dicefn"]
        logp, actions = dice.sample_categorical(net(obs))
        cost = (actions - goal) ** 2
        loss = (dice.cost_node(cost, logp) + dice.batch_baseline_term(cost, logp)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def theirs():
        net, opt = nets["dice-mc"]
        logp, actions = dmc.sample_categorical(net(obs))
        cost = (actions - goal) ** 2
        loss = (dmc.cost_node(cost, [logp]) + dmc.batch_baseline_term(cost, [logp])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    cmp = compare({"dicefn": ours, "hand-written": hand, "dice-mc": theirs}, cfg, rounds=rounds)
    r_hand, r_dmc = cmp.ratio("dicefn", "hand-written"), cmp.ratio("dicefn", "dice-mc")
    rows = [
        [n, f"{cmp.median_s(n) * 1e3:.2f}"] for n in cmp.names
    ]
    body = (
        f"One training step of an MLP policy ({obs_dim}-{hidden}-{hidden}-{n_actions}, tanh) on "
        f"a batch of {batch}: forward, Gumbel-max sampling from torch's global RNG, a cost per "
        "sample, the score-function loss with a batch baseline, backward, Adam. dicefn: "
        "`sample_categorical` + `cost_node` + `batch_baseline_term` (leave-one-out); dice-mc "
        "0.1.1: the same three calls; hand-written: `logp * (cost - cost.mean())`. Each has its "
        "own copy of the network with the same initialisation.\n\n"
        + md_table(["step", "median time per step (ms)"], rows)
        + "\n\n"
        + md_table(
            ["ratio", "median (IQR)", "95% CI of median", "wall-clock median"],
            [
                [f"dicefn / {r.b}", r.fmt(), "%.3f–%.3f" % r.ci95, f"{r.wall_median:.3f}"]
                for r in (r_hand, r_dmc)
            ],
        )
        + f"\n\n{cmp.describe()}."
    )
    bars = [
        Bar("2", "training step, dicefn / hand-written", r_hand.median, 1.05, "<=", r_hand.fmt()),
        Bar("2", "training step, dicefn / dice-mc", r_dmc.median, 1.02, "<=", r_dmc.fmt()),
    ]
    headline = [
        ("Policy-gradient step (MLP, batch 8192), dicefn / hand-written", f"{r_hand.median:.3f}", "<= 1.05"),
        ("Same step, dicefn / dice-mc 0.1.1", f"{r_dmc.median:.3f}", "<= 1.02"),
    ]
    return Section(
        "overhead", "2. Overhead of a training step", body, bars, headline,
        {"ratios": {"hand": r_hand.values, "dice-mc": r_dmc.values},
         "ms": {n: cmp.median_s(n) * 1e3 for n in cmp.names}},
    )


# 3. Per-example estimators: vmap(grad) against the loop ---------------------------------------


def per_example(cfg: Config) -> Section:
    """Per-example DiCE gradients for 256 examples, each with its own key and 8 samples."""
    n_examples, feat, hidden, n_actions, k = 256, 16, 32, 8, 8
    rounds = cfg.pick(40, 5)
    dev = cfg.dev
    gen = torch.Generator().manual_seed(cfg.seed)
    params = (
        0.3 * torch.randn(feat, hidden, generator=gen).to(dev),
        0.3 * torch.randn(hidden, n_actions, generator=gen).to(dev),
    )
    xs = torch.randn(n_examples, feat, generator=gen).to(dev)
    table = torch.randn(n_examples, n_actions, generator=gen).to(dev) + 3.0
    keys = dice.random.split(_key(cfg.seed, cfg), n_examples)

    def objective(params, x, costs, key):
        w1, w2 = params
        logits = torch.tanh(x @ w1) @ w2
        logp, actions = dice.sample_categorical(logits.expand(k, n_actions), key=key)
        cost = costs[actions]
        return (dice.cost_node(cost, logp) + dice.batch_baseline_term(cost, logp)).mean()

    g = grad(objective)
    batched = vmap(g, in_dims=(None, 0, 0, 0))

    def vectorised():
        return batched(params, xs, table, keys)

    def loop():
        out = [g(params, xs[i], table[i], keys[i]) for i in range(n_examples)]
        return tuple(torch.stack(t) for t in zip(*out))

    for a, b in zip(vectorised(), loop()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    cmp = compare({"loop": loop, "vmap": vectorised}, cfg, rounds=rounds, target_s=0.05)
    r = cmp.ratio("loop", "vmap")
    body = (
        f"Per-example gradients of a DiCE objective for {n_examples} examples: a "
        f"{feat}-{hidden}-{n_actions} policy, {k} samples per example drawn inside the function "
        "with the example's own key, leave-one-out baseline over those samples. "
        "`vmap(grad(f), in_dims=(None, 0, 0, 0))` against a Python loop of `grad(f)` over the "
        "examples (the two give the same gradients; checked).\n\n"
        + md_table(
            ["candidate", "median time (ms)"],
            [[n, f"{cmp.median_s(n) * 1e3:.2f}"] for n in cmp.names],
        )
        + f"\n\nSpeed-up (loop / vmap): **{r.fmt(1)}**, wall-clock {r.wall_median:.1f}. "
        f"{cmp.describe()}."
    )
    bars = [Bar("3", "per-example gradients, loop / vmap(grad)", r.median, 20.0, ">=", r.fmt(1))]
    headline = [("Per-example gradients, 256 examples: speed-up of vmap(grad) over the loop",
                 f"{r.median:.1f}x", ">= 20x")]
    return Section("per_example", "3. Per-example estimators", body, bars, headline,
                   {"ratio": r.values})


# 4. Hessian: torch.func against torch.autograd.functional ----------------------------------


def _hessian_case(cfg: Config, feat: int, n_actions: int, n: int):
    dev = cfg.dev
    gen = torch.Generator().manual_seed(cfg.seed + feat)
    theta = (0.3 * torch.randn(feat * n_actions, generator=gen, dtype=torch.float64)).to(dev)
    obs = torch.randn(n, feat, generator=gen, dtype=torch.float64).to(dev)
    table = torch.randn(feat, n_actions, generator=gen, dtype=torch.float64).to(dev)
    key = _key(cfg.seed + 1, cfg)

    def objective(theta):
        logits = obs @ theta.reshape(feat, n_actions)
        logp, actions = dice.sample_categorical(logits, key=key)
        cost = (obs.abs() @ table).gather(-1, actions[:, None]).squeeze(-1)
        return (dice.cost_node(cost, logp) + dice.batch_baseline_term(cost, logp)).mean()

    return theta, objective


def hessian_bench(cfg: Config) -> Section:
    """torch.func.hessian against torch.autograd.functional.hessian, same function."""
    cases = [("small", 4, 8, 256), ("larger", 32, 10, 256), ("small", 4, 8, 1024),
             ("larger", 32, 10, 1024)]
    rows, bars, headline, data = [], [], [], {}
    for name, feat, n_actions, n in cases:
        theta, objective = _hessian_case(cfg, feat, n_actions, n)
        func_h = hessian(objective)
        a = func_h(theta)
        b = torch.autograd.functional.hessian(objective, theta)
        torch.testing.assert_close(a, b)
        cmp = compare(
            {
                "torch.func.hessian": lambda: func_h(theta),
                "autograd.functional.hessian": lambda: torch.autograd.functional.hessian(
                    objective, theta
                ),
            },
            cfg,
            rounds=cfg.pick(30 if name == "small" else 15, 3),
            target_s=0.05,
        )
        r = cmp.ratio("torch.func.hessian", "autograd.functional.hessian")
        p = theta.numel()
        rows.append([
            f"{name}: {p} parameters", n,
            f"{cmp.median_s('torch.func.hessian') * 1e3:.1f}",
            f"{cmp.median_s('autograd.functional.hessian') * 1e3:.1f}",
            r.fmt(3),
            f"{r.wall_median:.3f}",
        ])
        data[f"{name}, n={n}"] = {"params": p, "n": n, "ratio": r.values}
        if name == "larger" and n == 256:
            bars.append(Bar("4", f"Hessian, {p} parameters, {n} samples: torch.func / "
                            "autograd.functional", r.median, 1.0, "<=", r.fmt(3)))
            headline.append([f"Hessian of a DiCE objective ({p} parameters, samples drawn "
                             "inside), torch.func / torch.autograd.functional",
                             f"{r.median:.2f} (256 samples)", "<= 1 (at 256 samples)"])
        elif name == "larger":
            headline[-1][1] += f"; {r.median:.2f} ({n} samples)"
            bars.append(Bar("4", f"Hessian, {p} parameters, {n} samples: torch.func / "
                            "autograd.functional (reported)", r.median, math.inf, "<=", r.fmt(3)))
        else:
            bars.append(Bar("4", f"Hessian, {p} parameters, {n} samples: torch.func / "
                            "autograd.functional (reported)", r.median, math.inf, "<=", r.fmt(3)))
    big = data["larger, n=1024"]
    body = (
        "The Hessian of a DiCE objective with sampling inside (a linear softmax policy over "
        "`n` random states, one categorical action per state drawn with an explicit key, "
        "leave-one-out baseline), float64. `torch.func.hessian` (forward-over-reverse, "
        "vectorised over the parameters) against `torch.autograd.functional.hessian` of the "
        "same function (one backward pass per parameter, in a Python loop). Both give the same "
        "matrix (checked). The bar is set at 256 samples (the batch the README's examples "
        "use). The vectorised route wins by removing per-pass overhead; with more samples per "
        "objective each of the loop's backward passes has enough work to amortise it, while "
        "the batched tangents (parameters x samples x actions, float64) add memory traffic: "
        f"at 1024 samples and {big['params']} parameters the ratio is "
        f"{statistics.median(big['ratio']):.2f} in this run ("
        + ("the loop is as fast or faster" if statistics.median(big["ratio"]) > 0.97
           else "the vectorised route still ahead")
        + "). Both routes differentiate the same function through the same dicefn code, so "
        "this is `torch.func`'s forward-over-reverse against autograd's reverse-over-reverse, "
        "not something dicefn adds.\n\n"
        + md_table(["policy", "samples n", "torch.func (ms)", "autograd.functional (ms)",
                    "ratio func / autograd, median (IQR)", "wall-clock"], rows)
    )
    return Section("hessian", "4. Hessian", body, bars, [tuple(h) for h in headline], data)


# 5. Keyed against global-RNG sampling ---------------------------------------------------------


def sampling(cfg: Config) -> Section:
    shape = (65536, 16)
    dev = cfg.dev
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed)).to(dev)
    key = _key(cfg.seed, cfg)
    cmp = compare(
        {
            "keyed": lambda: dice.sample_categorical(logits, key=key),
            "global RNG": lambda: dice.sample_categorical(logits),
            "dice-mc": lambda: dmc.sample_categorical(logits),
        },
        cfg,
        rounds=cfg.pick(100, 10),
        target_s=0.02,
    )
    r = cmp.ratio("keyed", "global RNG")
    r_dmc = cmp.ratio("keyed", "dice-mc")
    body = (
        f"`sample_categorical` on logits of shape {shape} (float32): with a key (Threefry-2x32-20 "
        "from integer tensor ops, then Gumbel-max) against torch's global RNG, and dice-mc's "
        "sampler for reference.\n\n"
        + md_table(
            ["candidate", "median time (ms)"],
            [[n, f"{cmp.median_s(n) * 1e3:.2f}"] for n in cmp.names],
        )
        + f"\n\nkeyed / global RNG: **{r.fmt()}** (wall-clock {r.wall_median:.3f}); keyed / "
        f"dice-mc: {r_dmc.fmt()}. {cmp.describe()}."
    )
    bars = [Bar("5", "sampling 65536 x 16, keyed / global RNG", r.median, 5.0, "<=", r.fmt())]
    headline = [("Sampling 65536 x 16, keyed / global RNG", f"{r.median:.2f}", "<= 5")]
    return Section("sampling", "5. Pure (keyed) sampling", body, bars, headline,
                   {"ratio": r.values})


# 6. Memory saved for backward ----------------------------------------------------------------


def saved_bytes(fn, inputs=()) -> tuple[int, int, int]:
    """Bytes autograd saves for backward when ``fn`` runs.

    Returns (total bytes of the distinct storages saved, bytes of those that are not the
    storage of one of ``inputs``, number of saved storages at least as large as the first
    input).
    """
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    own = {x.untyped_storage().data_ptr() for x in inputs}
    big = inputs[0].untyped_storage().nbytes() if inputs else 0
    total = sum(storages.values())
    new = sum(b for p, b in storages.items() if p not in own)
    n_big = sum(b >= big for b in storages.values())
    return total, new, n_big


def memory(cfg: Config) -> Section:
    vocab = 32000
    rows_n = cfg.pick(256, 16)
    dev = cfg.dev
    gen = torch.Generator().manual_seed(cfg.seed)
    lm = getattr(dice, "lm", None)
    results, bars = [], []
    for dtype in (torch.float32, torch.bfloat16):
        dname = str(dtype).replace("torch.", "")
        # (a) Rows of logits and one sampled action per row.
        logits = torch.randn(rows_n, vocab, generator=gen).to(dev, dtype).requires_grad_()
        actions = torch.randint(0, vocab, (rows_n,), generator=gen).to(dev)
        groups = [("rows", (logits, actions), rows_n, "F.cross_entropy", {
            "dicefn.logp_categorical": lambda: dice.logp_categorical(logits, actions),
            "log_softmax + gather (dice-mc 0.1.1)": lambda: dmc.logp_categorical(logits, actions),
            "F.cross_entropy": lambda: F.cross_entropy(logits, actions, reduction="none"),
        })]
        # (b) A sequence: logits[t - 1] scores ids[t], a completion mask zeroes position 0.
        if lm is not None:
            seq = logits.unsqueeze(0)  # [1, L - 1, V], the same storage
            ids = torch.randint(0, vocab, (1, rows_n + 1), generator=gen).to(dev)
            mask = torch.ones_like(ids, dtype=torch.bool)
            mask[:, 0] = False

            def ce_masked():
                nll = F.cross_entropy(seq.transpose(1, 2), ids[:, 1:], reduction="none")
                return torch.where(mask[:, 1:], -nll, 0.0)

            groups.append(("sequence", (seq, ids, mask), rows_n, "F.cross_entropy + mask", {
                "dicefn.lm.completion_logp": lambda: lm.completion_logp(seq, ids, mask),
                "F.cross_entropy + mask": ce_masked,
            }))
        for group, inputs, n, ref, cands in groups:
            measured = {name: saved_bytes(f, inputs) for name, f in cands.items()}
            ref_total = measured[ref][0]
            for name, (total, new, n_big) in measured.items():
                results.append([dname, group, name, f"{total / n:,.1f}", f"{new / n:,.1f}", n_big,
                                f"{total / ref_total:.6f}" if name != ref else "1 (reference)"])
                if name.startswith("dicefn"):
                    bars.append(Bar("6", f"{name}, {dname}: saved bytes / {ref}'s",
                                    total / ref_total, 1.0, "<=", f"{total / ref_total:.6f}"))
    body = (
        f"Bytes autograd saves for backward when scoring {rows_n} rows (tokens) of logits over "
        f"a vocabulary of {vocab}: distinct storages caught by `saved_tensors_hooks`, per row. "
        "\"Beyond inputs\" leaves out storages that belong to the function's inputs (logits, "
        "actions/ids, mask: memory the caller holds anyway while the logits are alive); "
        "\"vocabulary-sized\" counts saved storages at least as large as the logits. For "
        "sequences the reference does the same job as `completion_logp` (per-token "
        "log-probabilities, zero where the completion mask is false) with `F.cross_entropy` and "
        "`torch.where`. Measured in eager mode (inside `torch.func` transforms, where saved-tensor "
        "hooks are unavailable, `logp_categorical` runs as `gather - logsumexp` and keeps one "
        "float per row more).\n\n"
        + md_table(["logits", "layout", "function", "saved bytes per row",
                    "beyond inputs, per row", "vocabulary-sized tensors saved",
                    "total / reference"], results)
    )
    worst = max(b.value for b in bars)
    headline = [("Bytes saved for backward at vocabulary 32k, dicefn / F.cross_entropy "
                 "(largest over logp_categorical, completion_logp; float32, bfloat16)",
                 f"{worst:.4f}", "<= 1")]
    return Section("memory", "6. Memory saved for backward", body, bars, headline,
                   {"rows": results})


# 7. Compile -------------------------------------------------------------------------------------


def compile_step(cfg: Config) -> Section:
    """A functional policy-gradient step with keyed sampling, eager against torch.compile."""
    import torch._dynamo

    batch = cfg.pick(8192, 1024)
    obs_dim, hidden, n_actions = 32, cfg.pick(64, 32), 16
    dev = cfg.dev
    torch.manual_seed(cfg.seed)
    net = _mlp(obs_dim, hidden, n_actions).to(dev)
    params = {k: v.detach() for k, v in net.named_parameters()}
    gen = torch.Generator().manual_seed(cfg.seed)
    obs = torch.randn(batch, obs_dim, generator=gen).to(dev)
    goal = torch.randint(0, n_actions, (batch,), generator=gen).to(dev, torch.float32)

    def loss(params, key):
        logits = functional_call(net, params, (obs,))
        logp, actions = dice.sample_categorical(logits, key=key)
        cost = (actions - goal) ** 2
        return (dice.cost_node(cost, logp) + dice.batch_baseline_term(cost, logp)).mean()

    def step(params, key):
        grads = grad(loss)(params, key)
        return {k: p - 1e-2 * grads[k] for k, p in params.items()}

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(params, _key(0, cfg))
    breaks = explained.graph_break_count
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    key = _key(1, cfg)
    t0 = time.perf_counter()
    out = compiled(params, key)
    cfg.sync()
    compile_s = time.perf_counter() - t0
    ref = step(params, key)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-5)
    cmp = compare({"eager": lambda: step(params, key), "compiled": lambda: compiled(params, key)},
                  cfg, rounds=cfg.pick(100, 10), target_s=0.02)
    r = cmp.ratio("compiled", "eager")
    body = (
        f"A functional training step: `grad` of a DiCE loss of an MLP policy "
        f"({obs_dim}-{hidden}-{hidden}-{n_actions}) on {batch} observations, with categorical "
        "actions drawn *inside* the step from an explicit key, then an SGD update; eager against "
        "`torch.compile(step, fullgraph=True)` (inductor). Same outputs (checked).\n\n"
        + md_table(
            ["", "value"],
            [
                ["graph breaks (`torch._dynamo.explain`)", breaks],
                ["graphs", explained.graph_count],
                ["first call (compilation; torch's on-disk cache can shorten it), s",
                 f"{compile_s:.1f}"],
                ["eager, ms per step", f"{cmp.median_s('eager') * 1e3:.2f}"],
                ["compiled, ms per step", f"{cmp.median_s('compiled') * 1e3:.2f}"],
                ["compiled / eager, median (IQR)", r.fmt()],
                ["compiled / eager, wall-clock", f"{r.wall_median:.3f}"],
            ],
        )
        + f"\n\n{cmp.describe()}."
    )
    bars = [
        Bar("7", "compiled training step: graph breaks", breaks, 0, "<=", str(breaks)),
        Bar("7", "compiled / eager step time (reported, no bar)", r.median, math.inf, "<=", r.fmt()),
    ]
    headline = [("torch.compile'd training step (keyed sampling inside): graph breaks; "
                 "compiled / eager time", f"{breaks}; {r.median:.2f}", "0 breaks")]
    return Section("compile", "7. torch.compile", body, bars, headline,
                   {"ratio": r.values, "breaks": breaks, "compile_s": compile_s})
