"""``python -m dicefn``: DiCE gradient and Hessian estimates next to exact values."""

from __future__ import annotations

import time

import torch
from torch.func import grad, hessian

import dicefn as dice

F64 = torch.float64


class TwoStageChain:
    """a1 ~ Cat(softmax(theta1)), a2 ~ Cat(softmax(theta2[a1])), cost f[a1] + g[a1, a2].

    Three first actions and three second actions: 3 + 9 = 12 parameters and 9 outcomes, so
    the expected cost and its derivatives are exact by enumeration. The costs carry an
    offset of 20, as real costs often do, which is what baselines are for.
    """

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.theta = 0.5 * torch.randn(12, generator=gen, dtype=F64)
        self.f = torch.tensor([1.0, -1.0, 0.5], dtype=F64)
        self.g = 2.0 * torch.randn(3, 3, generator=gen, dtype=F64) + 20.0

    def exact(self, theta: torch.Tensor) -> torch.Tensor:
        p1 = torch.softmax(theta[:3], -1)
        p2 = torch.softmax(theta[3:].reshape(3, 3), -1)
        return (p1 * (self.f + (p2 * self.g).sum(-1))).sum()

    def surrogate(self, theta: torch.Tensor, key: torch.Tensor, n: int, baseline: str) -> torch.Tensor:
        k1, k2 = dice.random.split(key)
        l1, a1 = dice.sample_categorical(theta[:3].expand(n, 3), key=k1)
        l2, a2 = dice.sample_categorical(theta[3:].reshape(3, 3)[a1], key=k2)
        cost = self.f[a1] + self.g[a1, a2]
        loss = dice.cost_node(cost, [l1, l2])
        if baseline == "leave-one-out":
            loss = loss + dice.batch_baseline_term(cost, [l1, l2])
        elif baseline == "per-node (dice-mc)":
            loss = loss + sum(dice.batch_baseline_term(cost, w) for w in (l1, l2))
        return loss.mean()


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1].item()


def _rel_err(est: torch.Tensor, exact: torch.Tensor) -> float:
    return (torch.linalg.norm(est - exact) / torch.linalg.norm(exact)).item()


def main(n: int = 4096, seed: int = 0) -> None:
    start = time.perf_counter()
    graph = TwoStageChain()
    theta = graph.theta
    exact_g = grad(graph.exact)(theta)
    exact_h = hessian(graph.exact)(theta)
    key = dice.random.key(seed)
    print("dicefn demo: derivatives of E[cost] for a two-stage categorical chain")
    print(f"(12 parameters, {n} samples drawn inside torch.func.hessian with explicit keys)\n")
    header = f"{'estimator':<24}{'derivative':<12}{'correlation':>12}{'rel. error':>12}"
    print(header)
    print("-" * len(header))
    estimates = {}
    for baseline in ("none", "leave-one-out", "per-node (dice-mc)"):
        f = lambda t, k: graph.surrogate(t, k, n, baseline)  # noqa: E731
        est_g = grad(f)(theta, key)
        est_h = hessian(f)(theta, key)
        estimates[baseline] = est_g
        for name, est, exact in (("gradient", est_g, exact_g), ("Hessian", est_h, exact_h)):
            print(f"{baseline:<24}{name:<12}{_corr(est, exact):>12.3f}{_rel_err(est, exact):>12.3f}")
    print("\nFirst six gradient entries:")
    print(f"{'exact':>10}{'no baseline':>14}{'leave-one-out':>16}")
    for i in range(6):
        print(
            f"{exact_g[i].item():>10.4f}{estimates['none'][i].item():>14.4f}"
            f"{estimates['leave-one-out'][i].item():>16.4f}"
        )
    print(
        "\nThe leave-one-out baseline is dicefn's any-order form: it cuts the error of the "
        "gradient and\nof the Hessian. The per-node form (dice-mc's baseline_term, one term per "
        "node) helps the\ngradient only."
    )
    print(f"\nDone in {time.perf_counter() - start:.1f} s.")
