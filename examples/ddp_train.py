"""Data-parallel DiCE training: DDP with the leave-one-out baseline over the global batch.

Two CPU processes (gloo backend), a few seconds:

    torchrun --nproc_per_node=2 examples/ddp_train.py

or one process, where the same code falls back to the local baseline:

    python examples/ddp_train.py

The task is a contextual bandit: for an observation ``x`` (4 numbers) the policy picks one
of 3 actions and pays a cost of 1 unless it picks ``argmax(x[:3])``, plus an offset of 10
that the baseline removes from the gradient. Each rank draws its own half of the batch
(``rank_key``), builds the usual DiCE surrogate, and takes the leave-one-out baseline over
the whole global batch (``dicefn.distributed.batch_baseline_term``); DDP averages the
gradients. The result is the gradient a single process would compute on the global batch.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from torch import nn

import dicefn as dice
import dicefn.distributed

BATCH = 32  # per rank
STEPS = 150
OFFSET = 10.0


def error_rate(policy: nn.Module, obs: torch.Tensor) -> float:
    """Expected cost without the offset: 1 - probability of the right action, averaged."""
    with torch.no_grad():
        probs = torch.softmax(policy(obs), -1)
        return 1.0 - probs.gather(-1, obs[:, :3].argmax(-1, keepdim=True)).mean().item()


def main() -> None:
    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    torch.manual_seed(0)  # the same initial policy everywhere (DDP also broadcasts rank 0's)
    policy = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    model = nn.parallel.DistributedDataParallel(policy) if distributed else policy
    opt = torch.optim.Adam(model.parameters(), lr=0.05)

    key = dice.random.key(0)
    held_out = dice.random.normal(dice.random.key(1), (4096, 4))
    before = error_rate(policy, held_out)
    if rank == 0:
        print(f"{world} rank{'s' if world > 1 else ''} "
              f"({'gloo' if distributed else 'no process group'}), "
              f"global batch {world * BATCH}, {STEPS} steps")
    start = time.perf_counter()
    for step in range(STEPS):
        # Same key on every rank; rank_key folds in the rank: independent, reproducible draws.
        k_obs, k_act = dice.random.split(dice.distributed.rank_key(dice.random.fold_in(key, step)))
        obs = dice.random.normal(k_obs, (BATCH, 4))
        logp, actions = dice.sample_categorical(model(obs), key=k_act)
        cost = (actions != obs[:, :3].argmax(-1)).float() + OFFSET
        baseline = dice.distributed.batch_baseline_term(cost, logp)  # over the global batch
        loss = (dice.cost_node(cost, logp) + baseline).mean()
        opt.zero_grad()
        loss.backward()  # DDP averages the gradients across ranks
        opt.step()
        if step % 50 == 0 or step == STEPS - 1:
            mean_cost = cost.sum().detach()
            if distributed:
                dist.all_reduce(mean_cost)
            if rank == 0:
                mean_cost = mean_cost.item() / (world * BATCH)
                print(f"step {step:3d}  global batch mean cost {mean_cost:.3f}")

    after = error_rate(policy, held_out)
    flat = torch.cat([p.detach().flatten() for p in policy.parameters()])
    copies = [torch.empty_like(flat) for _ in range(world)]
    if distributed:
        dist.all_gather(copies, flat)
    else:
        copies = [flat]
    same = all(torch.equal(c, flat) for c in copies)
    if rank == 0:
        print(f"expected cost {before:.3f} -> {after:.3f} (error rate on held-out observations, "
              f"offset {OFFSET:g} removed) in {time.perf_counter() - start:.1f} s")
        print(f"parameters identical on every rank: {same}")
    if distributed:
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
