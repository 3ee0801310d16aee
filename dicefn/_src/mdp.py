"""A random tabular MDP with exact values and derivatives: the Loaded DiCE demo benchmark.

Private helper shared by the tests, benchmarks and notebooks (not part of the public API).
The setup follows the Loaded DiCE authors' demo (Farquhar, Whiteson and Foerster, NeurIPS
2019, arXiv:1909.10549): 5 states, 4 actions, a random transition tensor, state rewards
``R = (randn(5) + 5) * 10``, a uniform start state, ``gamma = 0.95``, a tabular softmax
policy with logits ``theta`` and episodes of 50 steps bootstrapped with a state value.

Everything is in **rewards** (the objective is maximised), as in the paper: the
surrogates' derivatives estimate those of :func:`exact_value`. Negate them for a loss.

Typical use::

    mdp, theta = random_mdp(seed=0)
    exact = element_derivatives(lambda t: exact_value(mdp, t), theta, orders=3)
    values = state_values(mdp, theta).detach()
    traj = rollout(mdp, theta, dice.random.key(1), batch_size=256, steps=50)
    est = element_derivatives(
        lambda t: loaded_dice_objective(mdp, t, traj, values, lam=1.0, tau=0.0), theta, 3)
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch.func import grad

from dicefn._src import prng
from dicefn._src.dice import cost_node
from dicefn._src.nodes import logp_categorical
from dicefn._src.sequences import gae, loaded_dice


class TabularMDP(NamedTuple):
    """A finite MDP. ``gamma`` is a Python float (a hyperparameter, not state)."""

    transitions: torch.Tensor  # shape=[S, A, S]: P(s' | s, a)
    rewards: torch.Tensor  # shape=[S]: reward received in state s
    start: torch.Tensor  # shape=[S]: initial state distribution
    gamma: float


class Trajectory(NamedTuple):
    """A batch of episodes of ``T`` steps."""

    states: torch.Tensor  # shape=[B, T + 1], int64: s_0 .. s_T (s_T only bootstraps)
    actions: torch.Tensor  # shape=[B, T], int64
    rewards: torch.Tensor  # shape=[B, T]: R[s_t]


def random_mdp(
    seed: int = 0,
    num_states: int = 5,
    num_actions: int = 4,
    gamma: float = 0.95,
    dtype: torch.dtype = torch.float64,
) -> tuple[TabularMDP, torch.Tensor]:
    """A random MDP as in the Loaded DiCE demo, and random policy logits.

    Transitions are drawn as by ``mdptoolbox.example.rand`` (which the authors used): for
    each state and action, a random sparsity threshold ``r ~ U(0, 1)`` keeps each next
    state with probability ``1 - r`` (at least one), with uniform random weights,
    normalised. Rewards ``(randn + 5) * 10``; uniform start; logits
    ``randn(num_states, num_actions)``.

    Returns:
      ``(mdp, theta)``, ``theta`` of shape ``[num_states, num_actions]``.
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (num_states, num_actions, num_states)
    threshold = torch.rand(num_states, num_actions, 1, generator=gen, dtype=dtype)
    keep = torch.rand(shape, generator=gen, dtype=dtype) > threshold
    fallback = torch.randint(num_states, (num_states, num_actions), generator=gen)
    empty = ~keep.any(-1)
    keep[empty, fallback[empty]] = True
    p = keep * torch.rand(shape, generator=gen, dtype=dtype)
    p = p / p.sum(-1, keepdim=True)
    rewards = (torch.randn(num_states, generator=gen, dtype=dtype) + 5.0) * 10.0
    start = torch.full((num_states,), 1.0 / num_states, dtype=dtype)
    theta = torch.randn(num_states, num_actions, generator=gen, dtype=dtype)
    return TabularMDP(p, rewards, start, float(gamma)), theta


def authors_mdp(dtype: torch.dtype = torch.float64) -> tuple[TabularMDP, torch.Tensor]:
    """The MDP instance and policy logits of the authors' published demo results.

    Their script seeds numpy and torch with 0, draws the transitions with
    ``mdptoolbox.example.rand(5, 4)`` (dense: per action and state, a random threshold
    mask, then uniform weights, normalised; replayed here with numpy's legacy
    ``RandomState(0)``), then ``R = (torch.randn(5) + 5) * 10`` and policy logits
    ``torch.randn(4, 5)`` (here transposed to ``[S, A]``); ``gamma = 0.95``. The values are
    the authors' float32 draws, held in ``dtype``. Needs numpy (the ``test`` extra).

    Returns:
      ``(mdp, theta)``, ``theta`` of shape ``[5, 4]``.
    """
    import numpy as np

    num_states, num_actions = 5, 4
    rs = np.random.RandomState(0)
    p = np.zeros((num_actions, num_states, num_states))
    for a in range(num_actions):
        for s in range(num_states):
            m = rs.random_sample(num_states)
            r = rs.random_sample()
            m[m <= r] = 0
            m[m > r] = 1
            if m.sum() == 0:
                m[rs.randint(0, num_states)] = 1
            p[a, s] = m * rs.random_sample(num_states)
            p[a, s] = p[a, s] / p[a, s].sum()
            rs.random_sample(num_states)  # the reward matrix mdptoolbox also draws
    gen = torch.Generator().manual_seed(0)
    rewards = (torch.randn(num_states, generator=gen) + 5) * 10
    pi = torch.randn(num_actions, num_states, generator=gen)
    transitions = torch.tensor(p, dtype=torch.float32).to(dtype).permute(1, 0, 2)
    transitions = transitions / transitions.sum(-1, keepdim=True)
    start = torch.full((num_states,), 1.0 / num_states, dtype=dtype)
    mdp = TabularMDP(transitions.contiguous(), rewards.to(dtype), start, 0.95)
    return mdp, pi.t().contiguous().to(dtype)


def policy_transitions(mdp: TabularMDP, theta: torch.Tensor) -> torch.Tensor:
    """``P_pi[s, s'] = sum_a pi(a | s) P(s' | s, a)``, shape ``[S, S]``."""
    pi = torch.softmax(theta, dim=-1)
    return torch.einsum("sa,sat->st", pi, mdp.transitions)


def state_values(mdp: TabularMDP, theta: torch.Tensor) -> torch.Tensor:
    """Exact state values ``(I - gamma P_pi)^-1 R``, shape ``[S]``, differentiable."""
    p_pi = policy_transitions(mdp, theta)
    eye = torch.eye(p_pi.shape[0], dtype=p_pi.dtype, device=p_pi.device)
    return torch.linalg.solve(eye - mdp.gamma * p_pi, mdp.rewards)


def exact_value(mdp: TabularMDP, theta: torch.Tensor) -> torch.Tensor:
    """The exact expected discounted return ``S0^T (I - gamma P_pi)^-1 R``: a scalar."""
    return mdp.start @ state_values(mdp, theta)


def truncated_value(
    mdp: TabularMDP, theta: torch.Tensor, steps: int, bootstrap: torch.Tensor
) -> torch.Tensor:
    """Exact ``E[sum_{t<T} gamma^t R(s_t) + gamma^T bootstrap(s_T)]`` with a fixed bootstrap.

    This is what the rollout surrogates estimate without bias (at ``lam=1`` with exact
    values): their bootstrap values are held fixed, so they miss the derivative of
    ``gamma^T V(s_T)`` through ``V`` itself (a relative bias of order ``gamma^T``).
    """
    p_pi = policy_transitions(mdp, theta)
    dist, total, disc = mdp.start, torch.zeros((), dtype=p_pi.dtype), 1.0
    for _ in range(steps):
        total = total + disc * (dist @ mdp.rewards)
        dist, disc = dist @ p_pi, disc * mdp.gamma
    return total + disc * (dist @ bootstrap)


def rollout(
    mdp: TabularMDP, theta: torch.Tensor, key: torch.Tensor, batch_size: int, steps: int = 50
) -> Trajectory:
    """Samples ``batch_size`` episodes of ``steps`` steps with an explicit key.

    The sample is a pure function of ``key`` (Gumbel-max with :mod:`dicefn.random`); it
    carries no gradient (score the actions with :func:`action_logp`).
    """
    th = theta.detach()
    k_start, k_act, k_next = prng.split(key, 3)
    s, a = th.shape
    log_p = mdp.transitions.log()
    g_start = prng.gumbel(k_start, (batch_size, s), dtype=th.dtype)
    g_act = prng.gumbel(k_act, (steps, batch_size, a), dtype=th.dtype)
    g_next = prng.gumbel(k_next, (steps, batch_size, s), dtype=th.dtype)
    state = torch.argmax(mdp.start.log() + g_start, dim=-1)
    states, actions = [state], []
    for t in range(steps):
        action = torch.argmax(th[state] + g_act[t], dim=-1)
        state = torch.argmax(log_p[state, action] + g_next[t], dim=-1)
        actions.append(action)
        states.append(state)
    states_t = torch.stack(states, dim=1)
    return Trajectory(states_t, torch.stack(actions, dim=1), mdp.rewards[states_t[:, :-1]])


def action_logp(theta: torch.Tensor, traj: Trajectory) -> torch.Tensor:
    """Log-probabilities of the taken actions, shape ``[B, T]``: the stochastic nodes."""
    return logp_categorical(theta[traj.states[:, :-1]], traj.actions)


def _discounts(mdp: TabularMDP, steps: int, like: torch.Tensor) -> torch.Tensor:
    return mdp.gamma ** torch.arange(steps, dtype=like.dtype, device=like.device)


def dice_objective(
    mdp: TabularMDP, theta: torch.Tensor, traj: Trajectory, values: torch.Tensor
) -> torch.Tensor:
    """Plain DiCE, no baseline: ``mean_b sum_t gamma^t r_t box(sum_{t'<=t} logp_t')``.

    The last reward is bootstrapped with ``gamma * values[s_T]`` (the authors' form).

    Args:
      values: state values used to bootstrap, shape ``[S]`` (detached).
    """
    logp = action_logp(theta, traj)
    steps = logp.shape[-1]
    r = traj.rewards + mdp.gamma * values[traj.states[:, -1]].unsqueeze(-1) * (
        torch.arange(steps, device=logp.device) == steps - 1
    ).to(logp.dtype)
    per_step = cost_node(r * _discounts(mdp, steps, logp), torch.cumsum(logp, dim=-1))
    return per_step.sum(-1).mean()


def loaded_dice_objective(
    mdp: TabularMDP,
    theta: torch.Tensor,
    traj: Trajectory,
    values: torch.Tensor,
    lam: float = 1.0,
    tau: float = 1.0,
) -> torch.Tensor:
    """Loaded DiCE with GAE(``tau``) advantages weighted by ``gamma^t`` (the authors' form).

    ``lam=1, tau=1``: the any-order baseline estimator; ``lam=1, tau=0``: Loaded DiCE with
    one-step advantages; ``lam=0``: LVC (first-order terms only). Forward value 0.

    Args:
      values: state values for GAE, shape ``[S]`` (detached; the exact ones in the demo).
      lam: the Loaded DiCE dependency decay.
      tau: the GAE parameter.
    """
    logp = action_logp(theta, traj)
    v = values[traj.states]
    adv = gae(traj.rewards, v, mdp.gamma, tau) * _discounts(mdp, logp.shape[-1], logp)
    return loaded_dice(logp, adv.detach(), lam).sum(-1).mean()


def element_derivatives(
    f: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, orders: int = 3
) -> list[torch.Tensor]:
    """Derivatives of orders ``1..orders`` as in the authors' demo.

    Order 1 is the full gradient of ``f``; order ``k + 1`` is the gradient of element
    ``[0, 0]`` of order ``k``. Each has the shape of ``theta``.
    """
    out, g = [], grad(f)
    for k in range(orders):
        out.append(g(theta))
        if k + 1 < orders:
            g = grad(lambda t, g=g: g(t)[0, 0])
    return out
