# %% [markdown]
# # MAML for reinforcement learning with DiCE: 2-D navigation
#
# Model-agnostic meta-learning (MAML, Finn et al. 2017) learns an initial policy from which
# one policy-gradient step on a new task's own episodes gives a good policy for that task.
# Its meta-gradient differentiates *through* that inner step, so it needs the derivative of
# a policy-gradient estimate with respect to the parameters: a second derivative of an
# expectation over sampled episodes. Written with the classic surrogate loss
# (`(cost - baseline) * log-prob`), the inner gradient has the right value but the wrong
# derivative, because the surrogate ignores that the episodes themselves were sampled from
# the policy being differentiated; the DiCE surrogate gets both right (Foerster et al. 2018;
# this was a known bias of early MAML-RL code, cf. Rothfuss et al. 2019, ProMP). This
# notebook meta-trains a Gaussian policy on a family of 2-D point-navigation tasks with the
# inner step taken by the DiCE gradient, tasks batched with `vmap`, and one `ema_baseline`
# state per task threaded through the training loop; it compares the return after
# adaptation with the first-order ablation (same inner step written without the magic box)
# and with a policy trained without adaptation.

# %%
import time

import matplotlib.pyplot as plt
import torch
from torch.func import grad, vmap
from tqdm import tqdm

import dicefn as dice

# The tensors here are small: one thread is faster than several, and robust on a busy machine.
torch.set_num_threads(1)
plt.rcParams.update({"figure.dpi": 90, "axes.grid": True, "grid.alpha": 0.3})
start_time = time.perf_counter()

# %% [markdown]
# ## The task family
#
# A point starts at the origin of the plane; a task is a goal `g` drawn uniformly from the
# square `[-0.5, 0.5]^2`. At each of 20 steps the policy proposes a move
# `a ~ N(W s + b, diag(exp(log_std))^2)` from the position `s`, the environment clips it to
# at most 0.1 per coordinate, and the step costs the distance from the new position to the
# goal. The episode return is minus the summed distance (distance units, 20 steps). A linear
# policy can home in on any goal (`W = -k I`, `b = k g`), but the goal is not observed: it
# has to be learnt from the task's own episodes, which is what the inner step does.
#
# `rollout` samples a batch of episodes with the parameters detached: the positions do not
# depend differentiably on the parameters. `episode_costs` then scores the actions with
# `dicefn.logp_normal` (a score-function node) and returns the per-step costs and the
# prefix sums of log-probabilities, the cost nodes of a trajectory.

# %%
TRAIN_TASKS, EPISODES, STEPS, MAX_MOVE = 20, 20, 20, 0.1
INNER_LR, META_LR, META_ITERATIONS, SEEDS = 0.5, 0.01, 300, 3

gen = torch.Generator().manual_seed(0)
train_goals = torch.rand(TRAIN_TASKS, 2, generator=gen) - 0.5
test_goals = torch.rand(100, 2, generator=gen) - 0.5


def init_params():
    return {"W": torch.zeros(2, 2), "b": torch.zeros(2), "log_std": torch.full((2,), -1.0)}


def rollout(params, key):
    """EPISODES episodes of STEPS steps: positions before each move and the moves, [E, T, 2]."""
    W, b = params["W"].detach(), params["b"].detach()
    std = params["log_std"].detach().exp()
    noise = dice.random.normal(key, (STEPS, EPISODES, 2))
    s, positions, moves = torch.zeros(EPISODES, 2), [], []
    for t in range(STEPS):
        a = s @ W.T + b + std * noise[t]
        positions.append(s)
        moves.append(a)
        s = s + a.clamp(-MAX_MOVE, MAX_MOVE)
    return torch.stack(positions, 1), torch.stack(moves, 1)


def episode_costs(params, episodes, goal):
    """Per-step costs [E, T] (distance to the goal) and their nodes (prefix sums of log-probs)."""
    positions, moves = episodes
    mean = positions @ params["W"].T + params["b"]
    logp = dice.logp_normal(mean, params["log_std"].exp(), moves).sum(-1)  # [E, T]
    cost = (positions + moves.clamp(-MAX_MOVE, MAX_MOVE) - goal).norm(dim=-1)
    return cost, logp.cumsum(-1)


# %% [markdown]
# ## The meta-objective
#
# For one task: sample episodes with the current parameters, take one gradient step on the
# task's DiCE loss (the inner step), sample fresh episodes with the adapted parameters and
# return their DiCE loss. `grad` of this function is the MAML meta-gradient; the inner
# `grad` is nested inside it, so the outer derivative flows through the inner gradient at
# second order, including through the magic box on the pre-adaptation episodes (how the
# policy's own sampling shapes what the inner step learns).
#
# Each task keeps one `ema_baseline` state for its pre-adaptation episodes and one for its
# post-adaptation episodes (per step: the costs are `[E, T]`, so the baseline is `[T]`).
# `baseline.update` returns the any-order baseline term of the value held *before* this
# batch, and the new state, which leaves `grad` through `has_aux`. The meta-objective is
# `vmap`ped over tasks, with the stacked states; a second `vmap` runs independent seeds.
#
# The modes:
# - **DiCE**: the inner loss is `cost_node(cost, nodes) + term`.
# - **first-order surrogate**: the inner loss is `(cost - baseline value) * nodes`, written
#   in plain torch: the same inner gradient, but its derivative lacks the score-function
#   terms of the pre-adaptation episodes.
# - **no adaptation**: no inner step; the policy is trained on the post-adaptation loss of
#   the tasks directly (multi-task training), and evaluated without adapting.

# %%
baseline = dice.ema_baseline(decay=0.9)
MODES = ["DiCE", "first-order surrogate", "no adaptation"]


def ema_value(state):
    """The value an EmaState holds (its documented fields), for the plain-torch ablation."""
    return state.biased_mean / (1.0 - state.decay_product).clamp(min=1e-12)


def inner_loss(params, episodes, goal, state, mode):
    cost, nodes = episode_costs(params, episodes, goal)
    value_before = ema_value(state)
    term, state = baseline.update(state, cost, nodes)
    if mode == "first-order surrogate":
        return ((cost - value_before) * nodes).mean(), state
    return (dice.cost_node(cost, nodes) + term).mean(), state


def adapt(params, goal, state, key, mode):
    """One inner policy-gradient step on the task's own episodes."""
    episodes = rollout(params, key)
    g, state = grad(inner_loss, has_aux=True)(params, episodes, goal, state, mode)
    adapted = {k: params[k] - INNER_LR * g[k] for k in params}
    pre_return = -episode_costs(params, episodes, goal)[0].sum(-1).mean()
    return adapted, state, pre_return


def meta_loss(params, goal, states, key, mode):
    pre_state, post_state = states
    k_pre, k_post = dice.random.split(key)
    if mode == "no adaptation":
        adapted, pre_return = params, torch.zeros(())
    else:
        adapted, pre_state, pre_return = adapt(params, goal, pre_state, k_pre, mode)
    cost, nodes = episode_costs(adapted, rollout(adapted, k_post), goal)
    term, post_state = baseline.update(post_state, cost, nodes)
    loss = (dice.cost_node(cost, nodes) + term).mean()
    post_return = -cost.sum(-1).mean()
    return loss, ((pre_state, post_state), (pre_return.detach(), post_return.detach()))


def adam(params, g, opt, step):
    """Plain functional Adam (vmappable): returns the new parameters and moments."""
    new_params, new_opt = {}, {}
    for k in params:
        m = 0.9 * opt[k][0] + 0.1 * g[k]
        v = 0.999 * opt[k][1] + 0.001 * g[k] ** 2
        m_hat, v_hat = m / (1 - 0.9**step), v / (1 - 0.999**step)
        new_params[k] = params[k] - META_LR * m_hat / (v_hat.sqrt() + 1e-8)
        new_opt[k] = (m, v)
    return new_params, new_opt


def meta_step(params, opt, states, key, step, mode):
    """One meta-update of one seed: all training tasks at once (vmap over tasks)."""
    keys = dice.random.split(key, TRAIN_TASKS)
    grads, (states, (pre_r, post_r)) = vmap(
        grad(meta_loss, has_aux=True), in_dims=(None, 0, 0, 0, None)
    )(params, train_goals, states, keys, mode)
    params, opt = adam(params, {k: v.mean(0) for k, v in grads.items()}, opt, step)
    return params, opt, states, pre_r.mean(), post_r.mean()


seeds_step = vmap(meta_step, in_dims=(0, 0, 0, 0, None, None))


def meta_train(mode):
    params = {k: v.expand(SEEDS, *v.shape).clone() for k, v in init_params().items()}
    opt = {k: (torch.zeros_like(v), torch.zeros_like(v)) for k, v in params.items()}
    one_task = lambda c: (baseline.init(c), baseline.init(c))  # noqa: E731
    states = vmap(vmap(one_task))(torch.zeros(SEEDS, TRAIN_TASKS, EPISODES, STEPS))
    keys = dice.random.split(dice.random.key(MODES.index(mode)), META_ITERATIONS * SEEDS)
    keys = keys.reshape(META_ITERATIONS, SEEDS, 2)
    curve = []
    for it in tqdm(range(META_ITERATIONS), desc=f"{mode:<22}", mininterval=10, ncols=100):
        params, opt, states, pre_r, post_r = seeds_step(params, opt, states, keys[it], it + 1, mode)
        curve.append(torch.stack([pre_r, post_r]))
    return params, states, torch.stack(curve)  # curve: [iterations, 2 (pre, post), SEEDS]


results, seconds = {}, {}
for mode in MODES:
    t0 = time.perf_counter()
    results[mode] = meta_train(mode)
    seconds[mode] = time.perf_counter() - t0

# %% [markdown]
# ## Return over meta-training
#
# Solid: return after the inner step (for "no adaptation", the policy's own return), on the
# post-adaptation episodes of the 20 training tasks, mean over seeds with a band of +-1
# standard deviation (smoothed over 10 iterations). Dashed: return before adaptation.

# %%
def smooth(x, k=10):
    kernel = torch.ones(k) / k
    padded = torch.cat([x[:1].expand(k - 1, *x.shape[1:]), x])
    return torch.stack([torch.conv1d(padded[:, i][None, None], kernel[None, None])[0, 0] for i in range(x.shape[1])], 1)


colors = dict(zip(MODES, ["tab:blue", "tab:orange", "tab:gray"]))
fig, ax = plt.subplots(figsize=(9, 4.8))
its = torch.arange(1, META_ITERATIONS + 1)
for mode in MODES:
    curve = results[mode][2]
    post = smooth(curve[:, 1])
    ax.plot(its, post.mean(1), color=colors[mode], label=f"{mode}: after adaptation" if mode != MODES[2] else mode)
    ax.fill_between(its, post.mean(1) - post.std(1), post.mean(1) + post.std(1), color=colors[mode], alpha=0.15)
    if mode != "no adaptation":
        ax.plot(its, smooth(curve[:, 0]).mean(1), color=colors[mode], ls="--", lw=1, label=f"{mode}: before adaptation")
ax.set_xlabel("meta-iteration")
ax.set_ylabel("episode return (minus summed distance to goal)")
ax.set_title(f"2-D navigation, {TRAIN_TASKS} training tasks, {SEEDS} seeds")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Adapting to new goals
#
# 100 goals not seen in training. A new task has no baseline history, so its inner step uses
# the stateless `leave_one_out` baseline (the same `Baseline` interface), and takes the
# same DiCE gradient step for every method (at test time the inner step's value is all that
# matters; the methods differ only in the initial policy they learnt). Returns are measured
# on 20 fresh episodes per goal, before and after the step.

# %%
loo = dice.leave_one_out()


def test_task(params, goal, key):
    k1, k2 = dice.random.split(key)
    episodes = rollout(params, k1)

    def loss(p):
        cost, nodes = episode_costs(p, episodes, goal)
        term, _ = loo.update(loo.init(cost), cost, nodes)
        return (dice.cost_node(cost, nodes) + term).mean()

    g = grad(loss)(params)
    adapted = {k: params[k] - INNER_LR * g[k] for k in params}
    before = -episode_costs(params, episodes, goal)[0].sum(-1).mean()
    after = -episode_costs(adapted, rollout(adapted, k2), goal)[0].sum(-1).mean()
    return before, after


test_keys = dice.random.split(dice.random.key(99), len(test_goals))
held_out = {}
for mode in MODES:
    params = results[mode][0]
    per_seed = vmap(vmap(test_task, in_dims=(None, 0, 0)), in_dims=(0, None, None))(params, test_goals, test_keys)
    held_out[mode] = tuple(x.mean(1) for x in per_seed)  # (before [SEEDS], after [SEEDS])

print(f"{'method':<24}{'before adaptation':>20}{'after one DiCE step':>21}{'train s':>9}")
for mode in MODES:
    b, a = held_out[mode]
    print(f"{mode:<24}{b.mean():>13.2f} +- {b.std():.2f}{a.mean():>14.2f} +- {a.std():.2f}{seconds[mode]:>9.1f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharex=True, sharey=True)
goal = torch.tensor([0.4, -0.3])
for ax, mode in zip(axes, MODES[:2]):
    params = {k: v[0] for k, v in results[mode][0].items()}
    k1, k2 = dice.random.split(dice.random.key(5))
    episodes = rollout(params, k1)

    def loss(p):
        cost, nodes = episode_costs(p, episodes, goal)
        term, _ = loo.update(loo.init(cost), cost, nodes)
        return (dice.cost_node(cost, nodes) + term).mean()

    adapted = {k: params[k] - INNER_LR * grad(loss)(params)[k] for k in params}
    for p, color, label in [(params, "0.5", "before"), (adapted, colors[mode], "after one step")]:
        pos, mv = rollout(p, k2)
        path = torch.cat([pos, (pos[:, -1:] + mv[:, -1:].clamp(-MAX_MOVE, MAX_MOVE))], 1)
        for i in range(4):
            ax.plot(path[i, :, 0], path[i, :, 1], color=color, lw=0.6, alpha=0.6)
        mean_path = path.mean(0)
        ax.plot(mean_path[:, 0], mean_path[:, 1], color=color, lw=2.5, label=f"{label}: mean of {EPISODES}")
    ax.plot(*goal, "k*", ms=14, label="goal")
    ax.set_title(f"{mode} (seed 0): 4 episodes and the mean path")
    ax.set_xlabel("x position")
    ax.set_aspect("equal")
axes[0].set_ylabel("y position")
axes[0].legend(fontsize=8, loc="lower left")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## What we saw

# %%
final_post = {m: results[m][2][-20:, 1].mean(0) for m in MODES}  # last 20 iterations, [SEEDS]
smoothed = {m: smooth(results[m][2][:, 1]).mean(1) for m in MODES}
TARGET = -6.0


def first_reaching(curve, level):
    hits = (curve >= level).nonzero()
    return int(hits[0, 0]) + 1 if len(hits) else None


fo_pre = smooth(results["first-order surrogate"][2][:, 0]).mean(1)
headline = {
    "train_return_after_adaptation_last20": {m: round(v.mean().item(), 2) for m, v in final_post.items()},
    "test_return_before": {m: round(held_out[m][0].mean().item(), 2) for m in MODES},
    "test_return_after": {m: round(held_out[m][1].mean().item(), 2) for m in MODES},
    "iterations_to_reach_minus6": {m: first_reaching(smoothed[m], TARGET) for m in MODES},
    "first_order_worst_pre_adaptation_return": round(fo_pre.min().item(), 2),
    "training_seconds": {m: round(s, 1) for m, s in seconds.items()},
}
for k, v in headline.items():
    print(f"{k}: {v}")
print(f"\nruntime: {time.perf_counter() - start_time:.0f} s")
ta, tb = headline["test_return_after"], headline["test_return_before"]
its_to = headline["iterations_to_reach_minus6"]
print(f"""
What we saw (returns are minus the summed distance to the goal over 20 steps; higher is better):
- Meta-trained with the DiCE inner step, the policy adapts to a new goal with one gradient
  step on 20 episodes: {tb['DiCE']:.2f} -> {ta['DiCE']:.2f} on 100 held-out goals ({SEEDS} seeds).
- The first-order surrogate (same inner step, no magic box) ends at {ta['first-order surrogate']:.2f} after adaptation. Over
  meta-training its post-adaptation return reaches {TARGET} after {its_to['first-order surrogate']} iterations against {its_to['DiCE']} for DiCE,
  and its pre-adaptation return first collapses (down to {headline['first_order_worst_pre_adaptation_return']:.2f}). Its meta-gradient lacks the
  score-function terms of the pre-adaptation episodes (it is biased); DiCE's has them.
- The policy trained without adaptation (one policy for all goals) gets {tb['no adaptation']:.2f}. In this linear
  policy family one test-time step from it also adapts ({ta['no adaptation']:.2f}), but less well than the DiCE
  meta-learnt start ({ta['DiCE']:.2f}).
""")
