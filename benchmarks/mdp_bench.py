"""The random tabular MDP (items 1 and 8): estimator quality against exact derivatives, and
the throughput of 1st-3rd order estimates against the authors' loop formulation."""

from __future__ import annotations

import statistics

import dice_mc.torch as dmc
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.distributions import Categorical  # noqa: E402

import dicefn as dice  # noqa: E402
from benchmarks.harness import Bar, Config, Section, compare, md_table  # noqa: E402
from dicefn._src import mdp  # noqa: E402

BATCHES = (64, 256, 1024, 4096)
STEPS = 50

# The authors' demo notebook, recomputed from its result file (../shared/reference/papers.md
# section 3): mean over 5 seeds of the correlation with the true 1st/2nd/3rd derivative.
PUBLISHED = {
    "DiCE, no baseline": {64: (.08, .36, .03), 256: (.27, .11, .12), 1024: (.20, -.12, -.05),
                          4096: (.68, -.04, -.11)},
    "any-order baseline (lambda=1, GAE tau=1)": {
        64: (.89, .26, .07), 256: (.96, .57, .30), 1024: (.99, .61, .29), 4096: (1.00, .91, .62)},
    "Loaded DiCE (lambda=1, GAE tau=0)": {
        64: (.98, .64, -.03), 256: (1.00, .87, .50), 1024: (1.00, .97, .53), 4096: (1.00, .99, .87)},
    "LVC (lambda=0)": {64: (.92, .83, .07), 256: (.97, .87, .01), 1024: (.99, .88, .14),
                       4096: (1.00, .88, .17)},
}
RECOMMENDED = "Loaded DiCE, lambda=1, GAE tau=0"


# Estimators (rewards convention, as the authors: derivatives estimate those of the value) ----


def _discounts(gamma: float, steps: int, like: torch.Tensor) -> torch.Tensor:
    return gamma ** torch.arange(steps, dtype=like.dtype, device=like.device)


def _bootstrapped(m: mdp.TabularMDP, traj: mdp.Trajectory, values: torch.Tensor) -> torch.Tensor:
    """Rewards with ``gamma * V(s_T)`` added to the last one (the authors' bootstrap)."""
    r = traj.rewards.clone()
    r[:, -1] = r[:, -1] + m.gamma * values[traj.states[:, -1]]
    return r


def dice_mc_first_order(m, theta, traj, values):
    """dice-mc 0.1.1: per-step ``cost_node`` plus its per-node ``baseline_term`` (b = V(s_t))."""
    logp = dmc.logp_categorical(theta[traj.states[:, :-1]], traj.actions)
    disc = _discounts(m.gamma, logp.shape[-1], logp)
    cost = _bootstrapped(m, traj, values) * disc
    base = values[traj.states[:, :-1]] * disc
    surrogate = dmc.cost_node(cost, [logp.cumsum(-1)]) + dmc.baseline_term(base, [logp])
    return surrogate.sum(-1).mean()


def dicefn_any_order(m, theta, traj, values):
    """dicefn's core functions: per-step cost nodes and Mao et al.'s any-order baseline
    ``(box(a_{<t}) - box(a_{<=t})) * V(s_t)`` as two ``baseline_term`` calls."""
    logp = dice.logp_categorical(theta[traj.states[:, :-1]], traj.actions)
    disc = _discounts(m.gamma, logp.shape[-1], logp)
    upto = dice.discounted_cumsum(logp, 1.0)
    before = upto - logp
    cost = _bootstrapped(m, traj, values) * disc
    base = values[traj.states[:, :-1]] * disc
    surrogate = (
        dice.cost_node(cost, upto) + dice.baseline_term(base, upto) - dice.baseline_term(base, before)
    )
    return surrogate.sum(-1).mean()


def estimators():
    """Name -> objective(mdp, theta, trajectory, exact state values)."""
    return {
        "DiCE, no baseline": mdp.dice_objective,
        "dice-mc cost_node + baseline_term (first-order baseline)": dice_mc_first_order,
        "dicefn any-order baseline (cost_node + baseline_term)": dicefn_any_order,
        "Loaded DiCE, lambda=1, GAE tau=0": lambda m, t, tr, v: mdp.loaded_dice_objective(
            m, t, tr, v, lam=1.0, tau=0.0),
        "Loaded DiCE, lambda=0.5, GAE tau=0": lambda m, t, tr, v: mdp.loaded_dice_objective(
            m, t, tr, v, lam=0.5, tau=0.0),
        "Loaded DiCE, lambda=0 (LVC), GAE tau=0": lambda m, t, tr, v: mdp.loaded_dice_objective(
            m, t, tr, v, lam=0.0, tau=0.0),
    }


# Which published row each of ours is the counterpart of.
COUNTERPART = {
    "DiCE, no baseline": "DiCE, no baseline",
    "dicefn any-order baseline (cost_node + baseline_term)":
        "any-order baseline (lambda=1, GAE tau=1)",
    "Loaded DiCE, lambda=1, GAE tau=0": "Loaded DiCE (lambda=1, GAE tau=0)",
    "Loaded DiCE, lambda=0 (LVC), GAE tau=0": "LVC (lambda=0)",
}


def element_derivatives(objective, theta: torch.Tensor, orders: int = 3) -> list[torch.Tensor]:
    """The authors' protocol with ``torch.autograd.grad``: the gradient, then the gradient of
    element [0, 0] of the previous order."""
    theta = theta.detach().requires_grad_()
    out = []
    g = torch.autograd.grad(objective(theta), theta, create_graph=orders > 1)[0]
    out.append(g.detach())
    for k in range(1, orders):
        g = torch.autograd.grad(g[0, 0], theta, create_graph=k + 1 < orders)[0]
        out.append(g.detach())
    return out


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


def quality(cfg: Config) -> Section:
    seeds = cfg.pick(50, 3)
    batches = cfg.pick(BATCHES, (64, 256))
    m, theta = mdp.authors_mdp(dtype=torch.float64)
    m = mdp.TabularMDP(*(x.to(cfg.dev) for x in m[:3]), m.gamma)
    theta = theta.to(cfg.dev)
    exact = element_derivatives(lambda t: mdp.exact_value(m, t), theta)
    values = mdp.state_values(m, theta).detach()
    ests = estimators()
    corr = {name: {b: [[], [], []] for b in batches} for name in ests}
    check_gap = 0.0
    for b in batches:
        for s in range(seeds):
            key = dice.random.fold_in(dice.random.key(cfg.seed + 1000), b * 1000 + s).to(cfg.dev)
            traj = mdp.rollout(m, theta, key, batch_size=b, steps=STEPS)
            got = {}
            for name, f in ests.items():
                est = element_derivatives(lambda t, f=f: f(m, t, traj, values), theta)
                got[name] = est
                for k in range(3):
                    corr[name][b][k].append(_corr(est[k], exact[k]))
            # The any-order baseline written with cost_node/baseline_term is Loaded DiCE with
            # lambda=1 and GAE tau=1 (same derivatives): a check on both.
            ld11 = element_derivatives(
                lambda t: mdp.loaded_dice_objective(m, t, traj, values, lam=1.0, tau=1.0), theta)
            for x, y in zip(got["dicefn any-order baseline (cost_node + baseline_term)"], ld11):
                check_gap = max(check_gap, ((x - y).abs().max() / y.abs().max()).item())
    mean = {n: {b: [statistics.mean(v) for v in corr[n][b]] for b in batches} for n in ests}
    sem = {
        n: {b: [statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else float("nan")
                for v in corr[n][b]] for b in batches}
        for n in ests
    }

    def cell(vals):
        return "/".join(f"{v:.2f}" for v in vals)

    rows = []
    for n in ests:
        row = [n] + [cell(mean[n][b]) for b in batches]
        rows.append(row)
        pub = COUNTERPART.get(n)
        if pub:
            rows.append([f"  published: {pub}"] + [cell(PUBLISHED[pub][b]) for b in batches])
    # The bar: the recommended estimator against the published Loaded DiCE row, every cell.
    # The published figures are 5-seed means: their own standard error is estimated from our
    # per-seed spread (sd / sqrt(5)); a cell matches unless ours is significantly below
    # (one-sided z < -2). The strict comparison (ours, rounded, >= published) is shown too.
    pub = PUBLISHED["Loaded DiCE (lambda=1, GAE tau=0)"]
    cells, strict_ok, z_ok, worst_z = [], 0, 0, float("inf")
    for b in batches:
        for k in range(3):
            ours, theirs = mean[RECOMMENDED][b][k], pub[b][k]
            se = sem[RECOMMENDED][b][k]
            sd = se * seeds**0.5
            # published figures are rounded to two decimals: test against the lowest value
            # that rounds to them.
            z = (ours - (theirs - 0.005)) / max((se**2 + sd**2 / 5) ** 0.5, 1e-3)
            worst_z = min(worst_z, z)
            strict = round(ours, 2) >= theirs
            strict_ok += strict
            z_ok += z > -2
            cells.append([b, k + 1, f"{ours:.3f} ± {se:.3f}", f"{theirs:.2f}",
                          f"{round(ours, 2) - theirs:+.2f}", "yes" if strict else "no",
                          f"{z:+.1f}", "yes" if z > -2 else "**no**"])
    n_cells = len(cells)
    body = (
        f"The Loaded DiCE demo (papers.md §3) with the authors' own MDP instance (5 states, 4 "
        f"actions, transitions replayed from `mdptoolbox.example.rand` with numpy seed 0, rewards "
        f"and policy logits from `torch.manual_seed(0)`), gamma 0.95, {STEPS}-step episodes "
        "bootstrapped with the exact state values, which also serve as the baseline / critic. "
        "Derivatives as in the authors' notebook: the gradient, then the gradient of element "
        "[0, 0] of the previous order; the metric is the Pearson correlation with the exact "
        f"derivative of `S0^T (I - gamma P_pi)^-1 R`, averaged over {seeds} seeds (the authors "
        "used 5); every estimator sees the same episodes (sampled with explicit keys by "
        "`dicefn._src.mdp.rollout`). float64.\n\n"
        "Each cell is 1st/2nd/3rd order; `published` rows are the authors' figures.\n\n"
        + md_table(["estimator"] + [f"batch {b}" for b in batches], rows)
        + f"\n\nCheck: the any-order baseline built from `cost_node`/`baseline_term` and "
        f"`loaded_dice(lam=1)` with GAE tau=1 give the same derivatives (largest relative "
        f"difference {check_gap:.1e}).\n\n"
        "**The bar.** dicefn's recommended estimator here, `loaded_dice` with lambda=1 (unbiased "
        "at every order) on `gae` advantages with tau=0 from the exact values, weighted by "
        "gamma^t, against the published Loaded DiCE row. The published figures are means of 5 "
        "seeds, so they carry sampling error of their own; a cell counts as matched unless ours "
        "is significantly below: z = (ours - (published - 0.005)) / sqrt(se_ours^2 + sd^2 / 5) "
        "> -2, with sd the per-seed standard deviation we measure and 0.005 the published "
        "figures' rounding. The strict comparison (ours rounded to two decimals >= published) "
        "is shown beside it.\n\n"
        + md_table(["batch", "order", "ours (± s.e.)", "published", "difference", "strictly >=",
                    "z", "matched"], cells)
        + f"\n\nStrictly at least the published figure in {strict_ok} of {n_cells} cells; "
        f"not significantly below in {z_ok} of {n_cells} (lowest z {worst_z:+.1f}). "
        "lambda=0.5 (biased at orders >= 2) gives up a little at order 2 and large batches for "
        "much lower variance at orders 2-3: see its row above."
    )
    bars = [
        Bar("1", f"{RECOMMENDED}: cells not significantly below the published Loaded DiCE row "
            f"(z > -2, of {n_cells})", z_ok, n_cells, ">=",
            f"{z_ok}/{n_cells} (strictly >=: {strict_ok}/{n_cells})"),
    ]
    headline = [(f"Correlation with exact 1st/2nd/3rd derivatives at batch {batches[-1]} "
                 f"({RECOMMENDED}; published Loaded DiCE: "
                 f"{cell(pub[batches[-1]])})", cell(mean[RECOMMENDED][batches[-1]]),
                 "matches published at every batch and order")]
    return Section("quality", "1. Estimator quality (random tabular MDP)", body, bars, headline,
                   {"mean": mean, "sem": sem, "batches": list(batches), "seeds": seeds,
                    "worst_z": worst_z})


def plot_quality(section: Section, path: str) -> None:
    d = section.data
    batches = d["batches"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 5.6), sharey=True)
    for k, ax in enumerate(axes):
        for name, per_b in d["mean"].items():
            ys = [per_b[b][k] for b in batches]
            es = [d["sem"][name][b][k] for b in batches]
            ax.errorbar(batches, ys, yerr=es, marker="o", ms=4, capsize=2, label=name)
        for pub_name, style in (("Loaded DiCE (lambda=1, GAE tau=0)", "k--"),
                                ("any-order baseline (lambda=1, GAE tau=1)", "k:")):
            pub = PUBLISHED[pub_name]
            ax.plot(batches, [pub[b][k] for b in batches], style, marker="x",
                    label=f"published: {pub_name}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set_xlabel("batch size (episodes of 50 steps)")
        ax.set_title(f"order {k + 1}")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("correlation with the exact derivative (Pearson r)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"Random tabular MDP: mean over {d['seeds']} seeds (± s.e.)")
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# 8. Throughput: the authors' loop formulation, reimplemented -------------------------------


def authors_sample(P, R, S0, pi, batch_size, steps):
    """The authors' ``sample``: a Python loop over time with ``Categorical``; ``pi`` has shape
    ``[A, S]`` and the probabilities of the taken actions stay differentiable."""
    dev = pi.device
    batch_states = torch.zeros([batch_size, steps + 1], device=dev)
    batch_pi_taken = torch.zeros([batch_size, steps], device=dev)
    batch_r = torch.zeros([batch_size, steps], device=dev)
    batch_mask = torch.ones([batch_size, steps + 1], device=dev)
    state = Categorical(S0.unsqueeze(0).repeat(batch_size, 1)).sample()
    for t in range(steps):
        r = R[state]
        probs = pi[:, state].softmax(0).transpose(0, 1)
        actions = Categorical(probs).sample()
        pi_taken = probs.gather(1, actions.unsqueeze(1)).squeeze(1)
        next_state = Categorical(P[actions, state]).sample()
        batch_states[:, t] = state
        batch_pi_taken[:, t] = pi_taken
        batch_r[:, t] = r
        state = next_state
    batch_states[:, -1] = state
    return batch_states, batch_pi_taken, batch_r, batch_mask


def authors_gae(rewards, values, mask, gamma, tau=1.0, gamma_weighted=False):
    values = values * mask
    deltas = rewards + gamma * values[:, 1:] - values[:, :-1]
    advantages = torch.zeros_like(deltas)
    g = torch.zeros_like(deltas[:, 0])
    for i in range(deltas.size(1) - 1, -1, -1):
        g = g * gamma * tau + deltas[:, i]
        advantages[:, i] = g
    if gamma_weighted:
        advantages = advantages * torch.cumprod(torch.ones_like(advantages) * gamma, 1) / gamma
    return advantages


def authors_loaded_objective(batch, V_s, gamma, tau, lam):
    """The authors' ``make_objective(..., use_dice="loaded")``: loops over time for GAE and for
    the weighted cumulative sum."""
    states, pi_taken, rewards, mask = batch
    log_pi = torch.log(pi_taken)
    values = V_s[states.long()].detach()
    advantages = authors_gae(rewards, values, mask, gamma, tau=tau, gamma_weighted=True)
    weighted_cumsum = torch.zeros_like(log_pi)
    weighted_cumsum[:, 0] = log_pi[:, 0]
    for t in range(1, log_pi.size(1)):
        weighted_cumsum[:, t] = lam * weighted_cumsum[:, t - 1] + log_pi[:, t]
    deps_exclusive = weighted_cumsum - log_pi
    full_deps = dmc.magic_box(weighted_cumsum) - dmc.magic_box(deps_exclusive)
    return (advantages * full_deps).sum(1).mean()


def throughput(cfg: Config) -> Section:
    batch = cfg.pick(4096, 512)
    lam, tau = 0.5, 0.0
    m, theta = mdp.authors_mdp(dtype=torch.float32)
    m = mdp.TabularMDP(*(x.to(cfg.dev) for x in m[:3]), m.gamma)
    theta = theta.to(cfg.dev)
    values = mdp.state_values(m, theta).detach()
    P = m.transitions.permute(1, 0, 2).contiguous()  # the authors' [A, S, S'] layout
    pi_authors = theta.t().contiguous()  # the authors' [A, S] layout
    torch.manual_seed(cfg.seed)
    key = dice.random.key(cfg.seed).to(cfg.dev)
    traj = mdp.rollout(m, theta, key, batch_size=batch, steps=STEPS)
    s_taken, a_taken = traj.states[:, :-1], traj.actions
    disc = _discounts(m.gamma, STEPS, theta)
    states_f = traj.states.to(torch.float32)
    ones = torch.ones_like(states_f)

    def ours_objective(t, logp):
        adv = dice.gae(traj.rewards, values[traj.states], m.gamma, tau) * disc
        return dice.loaded_dice(logp, adv, lam).sum(-1).mean()

    def authors_objective(pi, pi_taken):
        return authors_loaded_objective((states_f, pi_taken, traj.rewards, ones), values,
                                        m.gamma, tau, lam)

    # (a) The same log-probabilities on both sides, from the policy table: only the
    # formulation of the objective differs.
    def ours_table():
        return element_derivatives(
            lambda t: ours_objective(t, torch.log_softmax(t, -1)[s_taken, a_taken]), theta)

    def authors_table():
        pi = pi_authors.detach().requires_grad_()
        return _authors_derivatives(authors_objective(pi, pi.softmax(0)[a_taken, s_taken]), pi)

    # (b) Log-probabilities from per-step logits gathered for every sample ([B, T, A]): dicefn
    # through `logp_categorical` (the MDP module's `action_logp`), the authors' way through the
    # probabilities of the taken actions.
    def ours_gathered():
        return element_derivatives(lambda t: ours_objective(t, mdp.action_logp(t, traj)), theta)

    def authors_gathered():
        pi = pi_authors.detach().requires_grad_()
        probs = pi.t()[s_taken].softmax(-1)
        pi_taken = probs.gather(-1, a_taken.unsqueeze(-1)).squeeze(-1)
        return _authors_derivatives(authors_objective(pi, pi_taken), pi)

    # (c) The whole pipeline: each side samples its own episodes.
    def ours_full():
        tr = mdp.rollout(m, theta, key, batch_size=batch, steps=STEPS)
        return element_derivatives(
            lambda t: mdp.loaded_dice_objective(m, t, tr, values, lam=lam, tau=tau), theta)

    def authors_full():
        pi = pi_authors.detach().requires_grad_()
        data = authors_sample(P, m.rewards, m.start, pi, batch, STEPS)
        obj = authors_loaded_objective(data, values, m.gamma, tau, lam)
        return _authors_derivatives(obj, pi)

    for ours, theirs in ((ours_table, authors_table), (ours_gathered, authors_gathered)):
        for x, y in zip(ours(), theirs()):
            torch.testing.assert_close(x, y.t(), rtol=2e-3, atol=2e-3)
    rounds = cfg.pick(30, 3)
    results = []
    for what, ours, theirs, n in (
        ("objective + 1st-3rd derivatives, same log-probabilities (from the policy table)",
         ours_table, authors_table, rounds),
        ("objective + 1st-3rd derivatives, log-probabilities from logits gathered per sample",
         ours_gathered, authors_gathered, rounds),
        ("sampling + objective + derivatives (each side its own sampler)",
         ours_full, authors_full, cfg.pick(15, 2)),
    ):
        cmp = compare({"authors": theirs, "dicefn": ours}, cfg, rounds=n, target_s=0.2)
        results.append((what, cmp, cmp.ratio("authors", "dicefn")))
    rows = [
        [what, f"{cmp.median_s('authors') * 1e3:.1f}", f"{cmp.median_s('dicefn') * 1e3:.1f}",
         r.fmt(1), f"{r.wall_median:.1f}"]
        for what, cmp, r in results
    ]
    r_bar = results[0][2]
    body = (
        f"1st, 2nd and 3rd-order derivative estimates (the authors' element protocol, "
        f"`torch.autograd.grad` with `create_graph` on both sides) for the MDP benchmark at "
        f"batch {batch} x {STEPS} steps, Loaded DiCE with lambda={lam} and GAE tau={tau}, float32. "
        "dicefn: `gae` and `loaded_dice` (vectorised over time). Authors: their `make_objective` "
        "reimplemented here, with Python loops over time for GAE and for the weighted "
        "cumulative sum (in-place slice writes), log-probabilities as the log of the taken "
        "actions' probabilities.\n\n"
        "Row 1 is the bar: both sides get the same episodes and the same log-probabilities "
        "(from `log_softmax` of the policy table, gathered), so only the formulation of the "
        "objective differs. Row 2 computes the log-probabilities from logits gathered for "
        "every step of every episode ([B, T, A] by advanced indexing, then "
        "`logp_categorical` as `dicefn._src.mdp.action_logp` does); that shared gather and its "
        "backward at every order dominate both sides. Row 3 is the whole pipeline: the "
        "authors' sampling loop with `Categorical` (whose probabilities carry the gradient) "
        "against `mdp.rollout` with explicit keys (Threefry draws for every step) plus "
        "`action_logp`. The estimates of rows 1 and 2 agree between the two sides (checked). "
        "On dicefn's side of rows 2 and 3 most of the time goes to that per-sample gather of "
        "logits and, in row 3, to drawing a Gumbel variable for every action and next state "
        "of every step with Threefry; a tabular policy can score its actions from the table "
        "as in row 1.\n\n"
        + md_table(["what", "authors' loops (ms)", "dicefn (ms)", "speed-up, median (IQR)",
                    "wall-clock"], rows)
        + "\n\n" + "; ".join(f"row {i + 1}: {cmp.describe()}" for i, (_, cmp, _) in
                              enumerate(results)) + "."
    )
    bars = [
        Bar("8", f"1st-3rd order estimates, batch {batch} x {STEPS}: authors' loops / dicefn",
            r_bar.median, 5.0, ">=", r_bar.fmt(1)),
        Bar("8", "same, log-probabilities gathered per sample (reported)", results[1][2].median,
            float("inf"), "<=", results[1][2].fmt(1)),
        Bar("8", "same, with each side's sampling (reported)", results[2][2].median,
            float("inf"), "<=", results[2][2].fmt(1)),
    ]
    headline = [(f"1st-3rd order MDP estimates, batch {batch} x {STEPS}: speed-up over the "
                 "authors' loop formulation", f"{r_bar.median:.1f}x", ">= 5x")]
    return Section("throughput", "8. Higher-order throughput", body, bars, headline,
                   {"ratio": r_bar.values, "gathered": results[1][2].values,
                    "full": results[2][2].values})


def _authors_derivatives(obj, pi):
    g = torch.autograd.grad(obj, pi, retain_graph=True, create_graph=True)[0]
    out = [g.detach()]
    for _ in range(2):
        g = torch.autograd.grad(g[0][0], pi, retain_graph=True, create_graph=True)[0]
        out.append(g.detach())
    return out
