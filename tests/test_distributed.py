"""dicefn.distributed: data-parallel baselines against single-process computations.

A module fixture starts one 2-process gloo group on the loopback interface (tests/dist_worker.py,
bounded in time) that runs every check once; the tests here compare what each rank computed
with the single-process computation on the concatenated batch. Also: the fallback without a
process group is exactly the local functions, and the torchrun example trains.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.func import grad

import dicefn as dice
import dicefn.distributed as ddist
import dist_worker as w

F64 = torch.float64
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TIMEOUT = 180  # seconds for the whole group; a hang fails instead of blocking


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_env(port: int) -> dict:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    loopback = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    if loopback:  # gloo connects through this interface instead of the host's address
        env["GLOO_SOCKET_IFNAME"] = loopback[0]
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def _run_group(out_dir: Path) -> None:
    env = _loopback_env(_free_port())
    log_paths = [out_dir / f"rank{rank}.log" for rank in range(w.WORLD)]
    procs = []
    for rank, log_path in enumerate(log_paths):
        with open(log_path, "w") as log:  # a file, not a pipe: a chatty rank never blocks
            procs.append(subprocess.Popen(
                [sys.executable, str(TESTS / "dist_worker.py"), str(out_dir)],
                env=dict(env, RANK=str(rank), WORLD_SIZE=str(w.WORLD)),
                stdout=log,
                stderr=subprocess.STDOUT,
            ))
    deadline = time.monotonic() + TIMEOUT
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    logs = [path.read_text() for path in log_paths]
    if any(p.returncode != 0 for p in procs):
        pytest.fail(
            "distributed workers failed or timed out:\n"
            + "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n{log[-4000:]}"
                        for r, (p, log) in enumerate(zip(procs, logs)))
        )


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    _run_group(out)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(w.WORLD)]


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# (a) DDP gradients equal the single-process gradient on the concatenated batch ----------------


def _single_process_grads(term_fn):
    """The training steps of ``ddp_check`` in one process: both ranks' samples, one batch."""
    policy = w.make_policy()
    opt = torch.optim.SGD(policy.parameters(), lr=w.DDP_LR)
    grads = []
    for step in range(w.DDP_STEPS):
        step_key = dice.random.fold_in(w.KEY, step)
        samples = [w.bandit_sample(policy, *w.bandit_batch(step_key, r)) for r in range(w.WORLD)]
        logps, costs = zip(*samples)
        logp, cost = torch.cat(logps), torch.cat(costs)
        loss = (dice.cost_node(cost, logp) + term_fn(cost, logp)).mean()
        opt.zero_grad()
        loss.backward()
        grads.append([p.grad.clone() for p in policy.parameters()])
        opt.step()
    return grads


def test_ddp_gradient_equals_single_process_on_concatenated_batch(ranks):
    expected = _single_process_grads(dice.batch_baseline_term)
    for r in ranks:
        for got_step, want_step in zip(r["ddp_global_grads"], expected, strict=True):
            for got, want in zip(got_step, want_step, strict=True):
                _close(got, want)
    # torch.func.grad per rank, averaged: the same first step
    for r in ranks:
        for got, want in zip(r["func_grads"], expected[0], strict=True):
            _close(got, want)


def test_ddp_with_per_rank_leave_one_out_differs(ranks):
    """Negative control: the per-rank baseline is another estimator, and the check sees it."""
    expected = _single_process_grads(dice.batch_baseline_term)
    got = ranks[0]["ddp_local_grads"][0]
    gap = max((g - e).abs().max().item() for g, e in zip(got, expected[0]))
    assert gap > 1e-3
    # ... while it does equal the average of per-rank single-process estimators
    policy = w.make_policy()
    step_key = dice.random.fold_in(w.KEY, 0)
    losses = []
    for r in range(w.WORLD):
        logp, cost = w.bandit_sample(policy, *w.bandit_batch(step_key, r))
        losses.append((dice.cost_node(cost, logp) + dice.batch_baseline_term(cost, logp)).mean())
    (sum(losses) / w.WORLD).backward()
    for g, p in zip(got, policy.parameters(), strict=True):
        _close(g, p.grad)


# (b) EMA states: identical on every rank, equal to one process fed the concatenated batches ---


def test_ema_states_identical_across_ranks_and_equal_single_process(ranks):
    for a, b in zip(ranks[0]["ema_states"], ranks[1]["ema_states"], strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)  # bitwise: every rank holds the same state
    baseline = dice.ema_baseline(w.EMA_DECAY)
    state = baseline.init(w.ema_costs(0, 0))
    for step in range(w.EMA_STEPS):
        cost = torch.cat([w.ema_costs(r, step) for r in range(w.WORLD)])
        held = state.biased_mean / (1 - state.decay_product) if step else torch.zeros(2, dtype=F64)
        for r, rank in enumerate(ranks):
            _close(rank["ema_held"][step], held.expand(w.ema_costs(r, step).shape))
        _, state = baseline.update(state, cost, [])
        for x, y in zip(ranks[0]["ema_states"][step], state, strict=True):
            _close(x, y)
    # uneven batches (3 and 5): the global mean is not the mean of the ranks' means
    means = [w.ema_costs(r, 0).mean(0) for r in range(w.WORLD)]
    wrong = (1 - w.EMA_DECAY) * (means[0] + means[1]) / 2
    assert not torch.allclose(ranks[0]["ema_states"][0].biased_mean, wrong)


# (c) dim=1: each prompt's samples spread across ranks ----------------------------------------


@pytest.mark.parametrize("case", ["uneven", "one_each"])
@pytest.mark.parametrize("via", ["", "_baseline"], ids=["function", "Baseline"])
def test_grouped_leave_one_out_across_ranks_equals_single_process(ranks, case, via):
    sizes = w.group_sizes(case)
    data = [w.group_data(r, k) for r, k in enumerate(sizes)]
    logits, actions, cost = (torch.cat(x, dim=1) for x in zip(*data))
    local = lambda c, n: dice.batch_baseline_term(c, n, dim=1)  # noqa: E731
    expected = w.group_grad(logits, actions, cost, local)
    for got, want in zip([r[f"dim1_{case}{via}"] for r in ranks], expected.split(sizes, dim=1)):
        _close(got, want)


# Transforms on each rank against a plain-torch reference of the global computation ------------


@pytest.mark.parametrize(
    "name", [f"loo/{t}" for t in w.TRANSFORMS] + [f"ema/{t}" for t in w.EMA_TRANSFORMS]
)
def test_transforms_match_reference_across_ranks(ranks, name):
    for r in ranks:
        got, want = r[name]
        torch.testing.assert_close(got, want)


# Groups, keys and errors in the group ---------------------------------------------------------


def test_groups_keys_and_errors(ranks):
    for r, res in enumerate(ranks):
        _close(res["group/explicit"], res["group/default"])
        torch.testing.assert_close(res["group/single"], res["group/local"], rtol=0, atol=0)
        for x, y in zip(res["group/single_ema"], res["group/local_ema"], strict=True):
            assert torch.equal(x, y)
        assert torch.equal(res["key/rank_key"], dice.random.fold_in(w.KEY, r))
        assert torch.equal(res["key/rank_key_single"], dice.random.fold_in(w.KEY, 0))
        assert "not a member" in res["error/not_member"]
        assert "at least 1 sample along dim 0 on every rank" in res["error/empty"]
        torch.testing.assert_close(res["group/bfloat16"], res["group/default"], rtol=2**-8, atol=0)
    assert not torch.equal(ranks[0]["group/default"], ranks[0]["group/local"])


# (d) Fallback: without a process group, exactly the local functions --------------------------


def _nodes_and_cost(shape):
    g = torch.Generator().manual_seed(5)
    logp = torch.randn(shape, generator=g, dtype=F64, requires_grad=True)
    return logp, torch.randn(shape, generator=g, dtype=F64) + 3


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_fallback_batch_baseline_term_is_local(dim):
    assert not torch.distributed.is_initialized()
    logp, cost = _nodes_and_cost((4, 3))
    got = ddist.batch_baseline_term(cost, logp, dim=dim)
    want = dice.batch_baseline_term(cost, logp, dim=dim)
    assert torch.equal(got, want)
    g1 = torch.autograd.grad(got.sum(), logp)[0]
    g2 = torch.autograd.grad(want.sum(), logp)[0]
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("name", ["ema", "loo"])
def test_fallback_baselines_are_local(name):
    make = {
        "ema": (ddist.ema_baseline, dice.ema_baseline, 0.7),
        "loo": (ddist.leave_one_out, dice.leave_one_out, 0),
    }
    dist_fn, local_fn, arg = make[name]
    a, b = dist_fn(arg), local_fn(arg)
    logp, cost = _nodes_and_cost((5, 2))
    sa, sb = a.init(cost), b.init(cost)
    for step in range(3):
        ta, sa = a.update(sa, cost + step, logp)
        tb, sb = b.update(sb, cost + step, logp)
        ga, gb = (torch.autograd.grad(t.sum(), logp)[0] for t in (ta, tb))
        assert torch.equal(ga, gb)
        for x, y in zip(sa, sb, strict=True):
            assert torch.equal(x, y)
    assert torch.equal(ddist.rank_key(w.KEY), dice.random.fold_in(w.KEY, 0))


def test_fallback_compiles_to_the_local_functions():
    """Under torch.compile(fullgraph=True) the process-group checks trace away."""

    def loss_fn(ema, loo, batch_term):
        def loss(logp, cost, state):
            term, state = ema.update(state, cost, logp)
            term2, _ = loo.update(loo.init(cost), cost, logp)
            term3 = batch_term(cost, logp)
            return (dice.cost_node(cost, logp) + term + term2 + term3).sum(), state

        return grad(loss, has_aux=True)

    logp, cost = _nodes_and_cost((5,))
    state = dice.EmaState(torch.tensor(2.0, dtype=F64), torch.tensor(0.5, dtype=F64))
    dist_fn = loss_fn(ddist.ema_baseline(0.5), ddist.leave_one_out(), ddist.batch_baseline_term)
    local_fn = loss_fn(dice.ema_baseline(0.5), dice.leave_one_out(), dice.batch_baseline_term)
    got = torch.compile(dist_fn, fullgraph=True, backend="aot_eager")(logp.detach(), cost, state)
    torch.testing.assert_close(got, local_fn(logp.detach(), cost, state), rtol=0, atol=0)


def test_fallback_errors_are_the_local_ones():
    logp, cost = _nodes_and_cost((1, 3))
    with pytest.raises(ValueError, match="at least 2 samples along dim 0"):
        ddist.batch_baseline_term(cost, logp)
    with pytest.raises(ValueError, match="at least 2 samples"):
        ddist.leave_one_out().update(dice.LeaveOneOutState(), cost, logp)
    with pytest.raises(TypeError, match="dim must be an int"):
        ddist.batch_baseline_term(cost, logp, dim=0.0)
    with pytest.raises(TypeError, match="dim must be an int"):
        ddist.leave_one_out(dim=True)
    with pytest.raises(TypeError, match="group must be None"):
        ddist.batch_baseline_term(cost, logp, group="world")
    with pytest.raises(TypeError, match="group must be None"):
        ddist.ema_baseline(0.9, group=0)
    with pytest.raises(ValueError, match=r"decay must lie in \[0, 1\)"):
        ddist.ema_baseline(1.0)
    with pytest.raises(TypeError, match="key"):
        ddist.rank_key(torch.zeros(2))


# The example script under torchrun ------------------------------------------------------------


def _torchrun_example():
    env = _loopback_env(_free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={env['MASTER_PORT']}",
           str(ROOT / "examples" / "ddp_train.py")]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def test_torchrun_example_trains():
    out = _torchrun_example()
    # In about 1 run in 25 under torchrun (torch 2.13, gloo), a rank aborts at process exit,
    # after the script has finished and destroyed its process group ("terminate called
    # without an active exception"). That teardown abort alone earns one rerun.
    if (out.returncode != 0 and "parameters identical on every rank" in out.stdout
            and "terminate called without an active exception" in out.stderr):
        out = _torchrun_example()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    m = re.search(r"expected cost ([\d.]+) -> ([\d.]+)", out.stdout)
    assert m, out.stdout
    assert float(m[2]) < 0.5 * float(m[1])
    assert "2 ranks" in out.stdout and "parameters identical on every rank" in out.stdout
