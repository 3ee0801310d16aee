"""One rank of the 2-process gloo group that tests/test_distributed.py starts.

Run as ``python tests/dist_worker.py OUT_DIR`` with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``
and ``MASTER_PORT`` set. Each rank runs every check below with ``dicefn.distributed`` and
saves what it computed (and, where the reference needs no collective, a plain-torch
reference of the same global computation) to ``OUT_DIR/rank{RANK}.pt``; the test process
compares them with single-process computations on the concatenated batches. The data of
every rank is a pure function of fixed seeds and of the rank, so the test process rebuilds
the global batch with the helpers defined here.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.func import grad, hessian, jacfwd, jacrev, vmap

import dicefn as dice
import dicefn.distributed as ddist

F64 = torch.float64
WORLD = 2
KEY = dice.random.key(2024)

# (a) DDP: a contextual bandit with a small policy ---------------------------------------------

DDP_BATCH, DDP_STEPS, DDP_LR = 8, 3, 0.5


def make_policy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)


def bandit_batch(step_key: torch.Tensor, rank: int):
    """Rank ``rank``'s observations and action key at a step (``rank_key`` on that rank)."""
    k_obs, k_act = dice.random.split(dice.random.fold_in(step_key, rank))
    return dice.random.normal(k_obs, (DDP_BATCH, 4), dtype=F64), k_act


def bandit_sample(policy, obs, k_act):
    """Log-probabilities and costs: 1 for a wrong action, plus an offset the baseline removes."""
    logp, a = dice.sample_categorical(policy(obs), key=k_act)
    cost = (a != obs[:, :3].argmax(-1)).to(F64) + 5.0 + obs[:, 3] ** 2
    return logp, cost


def ddp_check(rank: int) -> dict:
    out = {}
    for name, term_fn in [
        ("global", ddist.batch_baseline_term),
        ("local", dice.batch_baseline_term),  # negative control: per-rank leave-one-out
    ]:
        model = nn.parallel.DistributedDataParallel(make_policy())
        opt = torch.optim.SGD(model.parameters(), lr=DDP_LR)
        grads = []
        for step in range(DDP_STEPS):
            step_key = dice.random.fold_in(KEY, step)
            k_obs, k_act = dice.random.split(ddist.rank_key(step_key))
            obs = dice.random.normal(k_obs, (DDP_BATCH, 4), dtype=F64)
            logp, cost = bandit_sample(model, obs, k_act)
            loss = (dice.cost_node(cost, logp) + term_fn(cost, logp)).mean()
            opt.zero_grad()
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
        out[f"ddp_{name}_grads"] = grads
    # The same global estimator without DDP: torch.func.grad of the per-rank loss, with the
    # gradients then averaged by an all-reduce.
    policy = make_policy()
    params = {k: v.detach() for k, v in policy.named_parameters()}

    def loss_fn(params, step_key):
        k_obs, k_act = dice.random.split(ddist.rank_key(step_key))
        obs = dice.random.normal(k_obs, (DDP_BATCH, 4), dtype=F64)
        logp, cost = bandit_sample(
            lambda x: torch.func.functional_call(policy, params, (x,)), obs, k_act
        )
        return (dice.cost_node(cost, logp) + ddist.batch_baseline_term(cost, logp)).mean()

    g = grad(loss_fn)(params, dice.random.fold_in(KEY, 0))
    for v in g.values():
        dist.all_reduce(v)
        v /= WORLD
    out["func_grads"] = [g[k] for k, _ in policy.named_parameters()]
    return out


# (b) EMA states across ranks ------------------------------------------------------------------

EMA_DECAY, EMA_STEPS = 0.8, 5


def ema_costs(rank: int, step: int) -> torch.Tensor:
    """Uneven local batches: rank 0 holds 3 costs per step, rank 1 holds 5; shape [B_r, 2]."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(3 + 2 * rank, 2, generator=g, dtype=F64) * 2 + 5


def ema_check(rank: int) -> dict:
    baseline = ddist.ema_baseline(EMA_DECAY)
    state = baseline.init(ema_costs(rank, 0))
    states, held = [], []
    for step in range(EMA_STEPS):
        cost = ema_costs(rank, step)
        logp = torch.zeros(cost.shape, dtype=F64, requires_grad=True)
        term, state = baseline.update(state, cost, logp)
        held.append(-torch.autograd.grad(term.sum(), logp)[0])  # the baseline applied
        states.append(state)
    return {"ema_states": states, "ema_held": held}


# (c) leave-one-out per prompt group spread across ranks (dim=1) --------------------------------

PROMPTS = 3


def group_data(rank: int, k: int):
    """Costs [PROMPTS, k] and logits [PROMPTS, k, 4] of this rank's samples of every prompt."""
    g = torch.Generator().manual_seed(50 + rank)
    logits = torch.randn(PROMPTS, k, 4, generator=g, dtype=F64)
    actions = torch.randint(0, 4, (PROMPTS, k), generator=g)
    cost = actions.to(F64) ** 2 + torch.arange(PROMPTS, dtype=F64)[:, None] * 10
    return logits, actions, cost


def group_sizes(case: str) -> list[int]:
    return {"uneven": [2, 3], "one_each": [1, 1]}[case]


def group_grad(logits, actions, cost, term_fn):
    logits = logits.clone().requires_grad_()
    logp = dice.logp_categorical(logits, actions)
    loss = (dice.cost_node(cost, logp) + term_fn(cost, logp)).sum()
    return torch.autograd.grad(loss, logits)[0]


def group_check(rank: int) -> dict:
    out = {}
    for case in ("uneven", "one_each"):
        logits, actions, cost = group_data(rank, group_sizes(case)[rank])
        out[f"dim1_{case}"] = group_grad(
            logits, actions, cost, lambda c, n: ddist.batch_baseline_term(c, n, dim=1)
        )
        baseline = ddist.leave_one_out(dim=1)
        out[f"dim1_{case}_baseline"] = group_grad(
            logits, actions, cost, lambda c, n: baseline.update(baseline.init(c), c, n)[0]
        )
    return out


# (e) transforms on a rank against a plain-torch reference of the global baseline -------------

THETA = torch.tensor([0.3, -0.2, 0.5, 0.1, -0.4, 0.7], dtype=F64)
SIZES = [4, 3]  # local batch sizes of ranks 0 and 1


def _box(t):
    return torch.exp(t - t.detach())


def _make_transform_data(rank: int):
    g = torch.Generator().manual_seed(70 + rank)
    feats = torch.randn(SIZES[rank], 5, generator=g, dtype=F64)
    actions = torch.randint(0, 3, (SIZES[rank],), generator=g)
    return feats, actions


TRANSFORM_DATA = [_make_transform_data(r) for r in range(WORLD)]  # drawn outside transforms


def transform_data(rank: int):
    return TRANSFORM_DATA[rank]


def _logits(t, feats):  # [6] -> [n, 3]
    return feats[:, :2] @ t.reshape(3, 2).T + t[0] * t[5] * feats[:, 2:]


def _cost(t, actions):
    return (actions.to(F64) + 1.0) * t[1] + actions.to(F64) ** 2 + 3.0


def dist_loss(t, rank):
    feats, actions = transform_data(rank)
    logp = dice.logp_categorical(_logits(t, feats), actions)
    cost = _cost(t, actions)
    return ((dice.cost_node(cost, logp) + ddist.batch_baseline_term(cost, logp)) ** 2).sum()


def ref_loss(t, rank):
    """The same loss in plain torch, the global leave-one-out written out over both ranks."""
    costs = [_cost(t, transform_data(r)[1]).detach() for r in range(WORLD)]
    total, count = sum(c.sum() for c in costs), sum(c.numel() for c in costs)
    feats, actions = transform_data(rank)
    tau = torch.log_softmax(_logits(t, feats), -1).gather(-1, actions[:, None])[:, 0]
    cost = _cost(t, actions)
    b = (total - cost.detach()) / (count - 1)
    return ((_box(tau) * (cost - b) + b) ** 2).sum()


def _third(f):
    return jacfwd(jacfwd(jacrev(f)))


def _backward(f):
    t = THETA.clone().requires_grad_()
    return torch.autograd.grad(f(t), t)[0]


STACK = torch.stack([THETA, THETA * 2, -THETA])
TRANSFORMS = {
    "backward": lambda f: _backward(f),
    "grad": lambda f: grad(f)(THETA),
    "jacrev": lambda f: jacrev(f)(THETA),
    "jacfwd": lambda f: jacfwd(f)(THETA),
    "hessian": lambda f: hessian(f)(THETA),
    "third_order": lambda f: _third(f)(THETA),
    "vmap": lambda f: vmap(f)(STACK),
    "vmap(grad)": lambda f: vmap(grad(f))(STACK),
    "compile(grad)": lambda f: torch.compile(grad(f), fullgraph=True, backend="aot_eager")(THETA),
}


def _ema_step(baseline, t, state, rank):
    """One EMA step: the loss (state before the batch) and the state after the global batch."""
    feats, actions = transform_data(rank)
    logp = dice.logp_categorical(_logits(t, feats), actions)
    cost = _cost(t, actions)
    term, state = baseline.update(state, cost, logp)
    return ((dice.cost_node(cost, logp) + term) ** 2).sum(), state


def _ref_ema_step(t, state, rank, decay):
    costs = [_cost(t, transform_data(r)[1]).detach() for r in range(WORLD)]
    mean = sum(c.sum() for c in costs) / sum(c.numel() for c in costs)
    feats, actions = transform_data(rank)
    tau = torch.log_softmax(_logits(t, feats), -1).gather(-1, actions[:, None])[:, 0]
    cost = _cost(t, actions)
    b = state.biased_mean / (1 - state.decay_product)
    loss = ((_box(tau) * (cost - b) + b) ** 2).sum()
    new = dice.EmaState(decay * state.biased_mean + (1 - decay) * mean, state.decay_product * decay)
    return loss, new


WARM = dice.EmaState(torch.tensor(4.0, dtype=F64), torch.tensor(0.5, dtype=F64))
WARM_TASKS = dice.EmaState(torch.tensor([4.0, 1.0, -2.0], dtype=F64), torch.full((3,), 0.5, dtype=F64))
EMA_TRANSFORMS = {
    "grad": lambda f: grad(f, has_aux=True)(THETA, WARM),
    "jacrev": lambda f: jacrev(f, has_aux=True)(THETA, WARM),
    "jacfwd": lambda f: jacfwd(f, has_aux=True)(THETA, WARM),
    # one state per task: vmap over stacked parameters and states
    "vmap(grad)": lambda f: vmap(grad(f, has_aux=True))(STACK, WARM_TASKS),
    "compile(grad)": lambda f: torch.compile(
        grad(f, has_aux=True), fullgraph=True, backend="aot_eager"
    )(THETA, WARM),
}


def transform_check(rank: int) -> dict:
    out = {}
    f = lambda t: dist_loss(t, rank)  # noqa: E731
    ref = lambda t: ref_loss(t, rank)  # noqa: E731
    for name, apply in TRANSFORMS.items():
        out[f"loo/{name}"] = (apply(f), apply(ref))
    baseline = ddist.ema_baseline(0.9)
    f = lambda t, s: _ema_step(baseline, t, s, rank)  # noqa: E731
    ref = lambda t, s: _ref_ema_step(t, s, rank, 0.9)  # noqa: E731
    for name, apply in EMA_TRANSFORMS.items():
        out[f"ema/{name}"] = (apply(f), apply(ref))
    return out


# (f) groups, keys and errors -----------------------------------------------------------------


def group_and_key_check(rank: int) -> dict:
    out = {}
    both = dist.new_group([0, 1])  # every rank creates every group, in the same order
    singles = [dist.new_group([0]), dist.new_group([1])]
    cost = transform_data(rank)[1].to(F64) + 1.0
    logp = torch.zeros(cost.shape, dtype=F64, requires_grad=True)

    def held(term):
        return -torch.autograd.grad(term.sum(), logp)[0]

    out["group/default"] = held(ddist.batch_baseline_term(cost, logp))
    out["group/explicit"] = held(ddist.batch_baseline_term(cost, logp, group=both))
    out["group/single"] = held(ddist.batch_baseline_term(cost, logp, group=singles[rank]))
    out["group/local"] = held(dice.batch_baseline_term(cost, logp))
    term = ddist.batch_baseline_term(cost.to(torch.bfloat16), logp)  # reduced in float32
    out["group/bfloat16"] = held(term)
    ema = ddist.ema_baseline(0.5, group=singles[rank])
    out["group/single_ema"] = ema.update(ema.init(cost), cost, logp)[1]
    local_ema = dice.ema_baseline(0.5)
    out["group/local_ema"] = local_ema.update(local_ema.init(cost), cost, logp)[1]
    try:  # this rank is not in the other rank's single group
        ddist.batch_baseline_term(cost, logp, group=singles[1 - rank])
        out["error/not_member"] = None
    except ValueError as e:
        out["error/not_member"] = str(e)
    try:  # every rank has an empty batch: each raises before the collective
        ddist.batch_baseline_term(torch.zeros(0, dtype=F64), torch.zeros(0, dtype=F64))
        out["error/empty"] = None
    except ValueError as e:
        out["error/empty"] = str(e)
    out["key/rank_key"] = ddist.rank_key(KEY)
    out["key/rank_key_single"] = ddist.rank_key(KEY, group=singles[rank])
    return out


def main(out_dir: str) -> None:
    rank = int(os.environ["RANK"])
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    torch.set_num_threads(1)
    results = {}
    for check in (ddp_check, ema_check, group_check, transform_check, group_and_key_check):
        results.update(check(rank))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
