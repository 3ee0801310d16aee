"""(init, update) baselines: EMA semantics against closed forms and dice-mc 0.1.1, state rules
(pure, tensor leaves, dtype/device, checkpoints), every transform against a plain-torch
reference, and unbiasedness and variance on the exact-enumeration graphs of tests/exact.py."""

import math

import pytest
import torch
from torch.func import grad, vmap

import dicefn as dice
from exact import (
    GRAPHS,
    Chain,
    exact_derivative,
    mc_derivatives,
    z_critical,
    zscores,
)
from grid import TRANSFORMS, assert_compiles_like_eager

F64 = torch.float64
BASELINES = {"ema": lambda: dice.ema_baseline(0.9), "loo": lambda: dice.leave_one_out()}


def _box(t):
    return torch.exp(t - t.detach())


def _assert_states_equal(a, b):
    assert type(a) is type(b)
    for x, y in zip(a, b, strict=True):  # states are flat NamedTuples of tensors
        assert x.dtype == y.dtype and x.device == y.device
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def _stream(seed, steps, shape, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) * 2 + 5 for _ in range(steps)]


def _held_value(baseline, state, cost):
    """The baseline value ``update`` applies: minus the derivative of the term in a node."""
    logp = torch.zeros(cost.shape, dtype=cost.dtype, requires_grad=True)
    term, _ = baseline.update(state, cost, logp)
    assert torch.equal(term, torch.zeros_like(cost))
    return -torch.autograd.grad(term.sum(), logp)[0]


def _dlogp(term, logp):
    """d term.sum() / d logp; zero where dice-mc returns a constant zero term (no data yet)."""
    if not term.requires_grad:
        return torch.zeros_like(logp)
    return torch.autograd.grad(term.sum(), logp)[0]


# EMA semantics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.99])
def test_ema_closed_form(decay):
    """After k batches the value is the decay-weighted mean of the k batch means."""
    baseline = dice.ema_baseline(decay)
    costs = _stream(0, 6, (5, 3))
    state = baseline.init(costs[0])
    for k, cost in enumerate(costs):
        expected = torch.zeros(3, dtype=F64)  # no data yet
        if k:
            means = torch.stack([c.mean(0) for c in costs[:k]])
            weights = torch.tensor([decay ** (k - 1 - i) for i in range(k)], dtype=F64)
            expected = (weights[:, None] * means).sum(0) / weights.sum()
        torch.testing.assert_close(_held_value(baseline, state, cost), expected.expand(5, 3))
        _, state = baseline.update(state, cost, [])
    assert state.decay_product.item() == pytest.approx(decay ** len(costs))


def test_ema_is_exact_on_a_constant_stream():
    baseline = dice.ema_baseline(0.99)
    cost = torch.full((4, 2), 7.0, dtype=F64)
    _, state = baseline.update(baseline.init(cost), cost, [])
    torch.testing.assert_close(_held_value(baseline, state, cost), cost)


def test_ema_term_uses_the_value_before_the_batch():
    baseline = dice.ema_baseline(0.5)
    first, second = _stream(1, 2, (6,))
    state0 = baseline.init(first)
    assert torch.equal(_held_value(baseline, state0, first), torch.zeros(6, dtype=F64))  # no data
    _, state1 = baseline.update(state0, first, [])
    torch.testing.assert_close(_held_value(baseline, state1, second), first.mean().expand(6))


def test_update_does_not_mutate_state_and_detaches():
    baseline = dice.ema_baseline(0.9)
    theta = torch.tensor(0.5, dtype=F64, requires_grad=True)
    cost = torch.arange(4.0, dtype=F64) * theta  # depends on the parameters
    state = baseline.init(cost)
    _, state = baseline.update(state, cost, [])
    copy = type(state)(*[x.clone() for x in state])
    _, new = baseline.update(state, cost, [])
    _assert_states_equal(state, copy)
    assert not any(x.requires_grad for x in new)


@pytest.mark.parametrize("trailing", [(), (3,)], ids=["B", "BxT"])
@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.99])
def test_ema_matches_dice_mc(decay, trailing):
    """Same stream of float32 costs (batch sizes varying): same terms, derivatives, state and
    debiased mean. Costs ``[B, T]`` get one dice-mc ``EMABaseline`` per position."""
    dm = pytest.importorskip("dice_mc.torch", reason="dice-mc 0.1.1 is in the test extra")
    g = torch.Generator().manual_seed(2)
    columns = trailing[0] if trailing else 1
    ours, theirs = dice.ema_baseline(decay), [dm.EMABaseline(decay) for _ in range(columns)]
    state = ours.init(torch.zeros(1, *trailing))
    for step in range(12):
        b = 2 + step % 5
        cost = torch.randn(b, columns, generator=g) * 3 + 10
        logp = torch.randn(b, columns, generator=g).requires_grad_()
        term, state = ours.update(state, cost.reshape(b, *trailing), [logp.reshape(b, *trailing)])
        ref = torch.stack([e(cost[:, t], [logp[:, t]]) for t, e in enumerate(theirs)], -1)
        torch.testing.assert_close(term, ref.reshape(b, *trailing))
        torch.testing.assert_close(_dlogp(term, logp), _dlogp(ref, logp))
        their_mean = torch.stack([e.mean_biased for e in theirs]).reshape(trailing)
        torch.testing.assert_close(state.biased_mean, their_mean)
        torch.testing.assert_close(state.decay_product, theirs[0].decay_cumprod)
        debiased = torch.stack([e.mean for e in theirs]).reshape(trailing)
        torch.testing.assert_close(state.biased_mean / (1 - state.decay_product), debiased)


# Leave-one-out ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_leave_one_out_is_batch_baseline_term(dim):
    cost = torch.randn(4, 5, dtype=F64)
    logp = torch.randn(4, 5, dtype=F64, requires_grad=True)
    baseline = dice.leave_one_out(dim)
    state = baseline.init(cost)
    assert state == dice.LeaveOneOutState() and len(state) == 0
    term, new = baseline.update(state, cost, logp)
    assert new == state
    ref = dice.batch_baseline_term(cost, logp, dim)
    torch.testing.assert_close(
        torch.autograd.grad(term.sum(), logp)[0], torch.autograd.grad(ref.sum(), logp)[0]
    )


# Validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5, math.nan])
def test_decay_outside_unit_interval_raises(decay):
    with pytest.raises(ValueError, match="decay must lie in"):
        dice.ema_baseline(decay)


@pytest.mark.parametrize("decay", ["0.9", True, torch.tensor(0.9)])
def test_decay_of_wrong_type_raises(decay):
    with pytest.raises(TypeError, match="decay must be a real number"):
        dice.ema_baseline(decay)


def test_leave_one_out_dim_must_be_int():
    with pytest.raises(TypeError, match="dim must be an int"):
        dice.leave_one_out(1.0)


def test_ema_bad_inputs_raise():
    baseline = dice.ema_baseline()
    state = baseline.init(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"\(4, 2\).*\(3,\)"):
        baseline.update(state, torch.zeros(4, 2), [])
    with pytest.raises(ValueError, match="scalar"):
        baseline.init(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating"):
        baseline.init(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="float64.*float32"):
        baseline.update(state, torch.zeros(4, 3, dtype=F64), [])
    with pytest.raises(TypeError, match="EmaState"):
        baseline.update(dice.LeaveOneOutState(), torch.zeros(4, 3), [])
    with pytest.raises(TypeError, match="LeaveOneOutState"):
        dice.leave_one_out().update(state, torch.zeros(4, 3), [])


# State rules -----------------------------------------------------------------------------------

DEVICES = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", BASELINES)
def test_states_are_tensors_with_the_dtype_and_device_of_the_cost(name, dtype, device):
    baseline = BASELINES[name]()
    cost = torch.ones(4, 3, dtype=dtype, device=device)
    logp = torch.zeros(4, 3, dtype=dtype, device=device)
    state = baseline.init(cost)
    state_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    for s in (state, baseline.update(state, cost, logp)[1]):
        assert isinstance(s, tuple) and hasattr(s, "_fields")
        for leaf in s:
            assert isinstance(leaf, torch.Tensor)
            assert leaf.dtype == state_dtype and leaf.device == cost.device
    term, _ = baseline.update(state, cost, logp)
    assert term.shape == cost.shape and term.device == cost.device
    if name == "ema":
        assert state.biased_mean.shape == (3,) and state.decay_product.shape == ()


def _warm(baseline, steps=4, shape=(8, 3)):
    state = baseline.init(torch.zeros(shape))
    for cost in _stream(4, steps, shape, torch.float32):
        _, state = baseline.update(state, cost, [])
    return state


@pytest.mark.parametrize("name", BASELINES)
def test_checkpoint_round_trip_weights_only(name, tmp_path):
    baseline = BASELINES[name]()
    state = _warm(baseline)
    stacked = vmap(lambda c: baseline.update(baseline.init(c), c, [])[1])(torch.randn(2, 8, 3))
    path = tmp_path / "ckpt.pt"
    torch.save({"baseline": state, "per_task": stacked, "step": 4}, path)
    loaded = torch.load(path, weights_only=True)
    _assert_states_equal(loaded["baseline"], state)
    _assert_states_equal(loaded["per_task"], stacked)
    # The loaded state carries on exactly as the original.
    cost = torch.randn(8, 3)
    logp = torch.randn(8, 3, requires_grad=True)
    t1, s1 = baseline.update(state, cost, logp)
    t2, s2 = baseline.update(loaded["baseline"], cost, logp)
    _assert_states_equal(s1, s2)
    torch.testing.assert_close(_dlogp(t1, logp), _dlogp(t2, logp))


# Transforms ------------------------------------------------------------------------------------

ACTIONS = torch.tensor([0, 2, 1, 2, 1])
WARM = dice.EmaState(torch.tensor(1.25, dtype=F64), torch.tensor(0.9**3, dtype=F64))
WARM_VALUE = WARM.biased_mean / (1 - WARM.decay_product)


def _logits(t):  # [6] -> [5, 3]
    return torch.stack([t[:3], t[3:], t[:3] * t[3:], t[:3] - t[3:], t[:3] ** 2])


def _cost(t, a):
    return (a.to(F64) + 1.0) * t[0] + a.to(F64) ** 2 + 3.0


def _with(baseline, state):
    def f(t):
        logp = dice.logp_categorical(_logits(t), ACTIONS)
        cost = _cost(t, ACTIONS)
        term, _ = baseline.update(state, cost, logp)
        return ((dice.cost_node(cost, logp) + term) ** 2).sum()

    return f


def _ref(kind):
    def f(t):
        tau = torch.log_softmax(_logits(t), -1).gather(-1, ACTIONS[:, None])[:, 0]
        cost = _cost(t, ACTIONS)
        c = cost.detach()
        b = WARM_VALUE.expand(5) if kind == "ema" else (c.sum() - c) / 4
        return ((_box(tau) * (cost - b) + b) ** 2).sum()

    return f


CASES = {
    "ema": (_with(dice.ema_baseline(0.9), WARM), _ref("ema")),
    "loo": (_with(dice.leave_one_out(), dice.LeaveOneOutState()), _ref("loo")),
}


@pytest.mark.parametrize("transform", TRANSFORMS, ids=str)
@pytest.mark.parametrize("name", CASES)
def test_transform_matches_reference(name, transform):
    f, ref = CASES[name]
    torch.testing.assert_close(TRANSFORMS[transform](f), TRANSFORMS[transform](ref))


@pytest.mark.parametrize("name", CASES)
def test_compile_fullgraph_matches_eager(name):
    assert_compiles_like_eager(CASES[name][0])


def _loss(baseline):
    """A step's loss, with the next baseline state as auxiliary output."""

    def loss(theta, state, key):
        logits = theta.reshape(2, 3).expand(16, 2, 3)
        logp, a = dice.sample_categorical(logits, key=key)
        cost = (a == 2).to(theta.dtype) + torch.arange(2, dtype=theta.dtype) * 5 + theta[0]
        term, state = baseline.update(state, cost, logp.cumsum(-1))
        return (dice.cost_node(cost, logp.cumsum(-1)) + term).mean(), state

    return loss


def _ref_step(theta, state, key, decay):
    """The EMA step of ``_loss`` in plain torch: per-position baseline, then the fold-in."""
    logits = theta.reshape(2, 3).expand(16, 2, 3)
    a = torch.argmax(logits.detach() + dice.random.gumbel(key, (16, 2, 3), dtype=theta.dtype), -1)
    tau = torch.log_softmax(logits, -1).gather(-1, a[..., None])[..., 0].cumsum(-1)
    cost = (a == 2).to(theta.dtype) + torch.arange(2, dtype=theta.dtype) * 5 + theta[0]
    b = torch.zeros_like(state.biased_mean)
    if state.decay_product < 1:
        b = state.biased_mean / (1 - state.decay_product)
    loss = (_box(tau) * (cost - b) + b).mean()
    mean = decay * state.biased_mean + (1 - decay) * cost.detach().mean(0)
    return torch.autograd.grad(loss, theta)[0], dice.EmaState(mean, state.decay_product * decay)


def test_grad_has_aux_threads_state_through_a_training_loop():
    baseline = dice.ema_baseline(0.8)
    step = grad(_loss(baseline), has_aux=True)
    theta = torch.randn(6, dtype=F64)
    state = ref_state = baseline.init(torch.zeros(16, 2, dtype=F64))
    for i in range(4):
        key = dice.random.key(i)
        g, state = step(theta, state, key)
        g_ref, ref_state = _ref_step(theta.clone().requires_grad_(), ref_state, key, 0.8)
        torch.testing.assert_close(g, g_ref)
        torch.testing.assert_close(state.biased_mean, ref_state.biased_mean)
        torch.testing.assert_close(state.decay_product, ref_state.decay_product)
        assert state.biased_mean.shape == (2,)  # one baseline per position
        theta = theta - 0.1 * g


@pytest.mark.parametrize("name", BASELINES)
def test_vmap_over_stacked_states_equals_loop(name):
    """One baseline per task: vmap over tasks' parameters, states and keys equals the loop."""
    baseline = BASELINES[name]()
    step = grad(_loss(baseline), has_aux=True)
    tasks = 3
    thetas = torch.randn(tasks, 6, dtype=F64)
    states = vmap(baseline.init)(torch.zeros(tasks, 16, 2, dtype=F64))
    looped = [baseline.init(torch.zeros(16, 2, dtype=F64)) for _ in range(tasks)]
    for i in range(3):
        keys = dice.random.split(dice.random.key(10 + i), tasks)
        grads, states = vmap(step)(thetas, states, keys)
        for k in range(tasks):
            g, looped[k] = step(thetas[k], looped[k], keys[k])
            torch.testing.assert_close(grads[k], g)
            for leaf, ref in zip(states, looped[k], strict=True):
                torch.testing.assert_close(leaf[k], ref)
        thetas = thetas - 0.1 * grads
    if name == "ema":  # tasks saw different costs, so their baselines differ
        assert not torch.allclose(states.biased_mean[0], states.biased_mean[1])


@pytest.mark.parametrize("name", BASELINES)
def test_compiled_training_step_matches_eager(name):
    baseline = BASELINES[name]()
    step = grad(_loss(baseline), has_aux=True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    theta = torch.randn(6, dtype=F64)
    state = ref = baseline.init(torch.zeros(16, 2, dtype=F64))
    for i in range(3):
        key = dice.random.key(20 + i)
        g, state = compiled(theta, state, key)
        g_ref, ref = step(theta, ref, key)
        torch.testing.assert_close(g, g_ref)
        for leaf, r in zip(state, ref, strict=True):
            torch.testing.assert_close(leaf, r)


# Proof: unbiased at every order, variance cut, on the exact-enumeration graphs ------------------

CHUNKS, N = 64, 256


def _warm_on_graph(graph, baseline, *, steps=20, n=N, seed=900):
    """Warms a baseline up on the graph's own costs (keys disjoint from the tests' keys)."""
    seen = []

    def update(state, cost, nodes):
        term, new = baseline.update(state, cost, nodes)
        seen.append(new)
        return term, new

    recorder = dice.Baseline(baseline.init, update)
    state = baseline.init(torch.zeros(n, dtype=F64))
    for key in dice.random.split(dice.random.key(seed), steps):
        graph.surrogate(graph.theta, key, n, recorder, state)
        state = seen.pop()
    return state


def _state_for(graph, name):
    baseline = BASELINES[name]()
    return baseline, _warm_on_graph(graph, baseline)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("graph_cls", GRAPHS, ids=lambda g: g.name)
def test_unbiased_with_state_baselines(graph_cls, name, order):
    graph = graph_cls()
    baseline, state = _state_for(graph, name)
    if name == "ema":  # warmed up: near the expected cost, but not equal to it
        assert state.decay_product < 0.2
    est = mc_derivatives(
        graph, order, seed=200 + order, chunks=CHUNKS, n=N, baseline=baseline, state=state
    )
    z = zscores(est, exact_derivative(graph, order))
    assert z.abs().max() < z_critical(z.numel()), z


def _leaky_ema(decay):
    """Negative control: folds the batch in *before* taking the baseline, so each cost's
    baseline includes that cost (with decay 0 it is the batch mean)."""
    ema = dice.ema_baseline(decay)

    def update(state, cost, nodes):
        _, new = ema.update(state, cost, nodes)
        term, _ = ema.update(new, cost, nodes)
        return term, new

    return dice.Baseline(ema.init, update)


@pytest.mark.parametrize("leaky", [False, True])
def test_baseline_from_the_same_batch_is_biased(leaky):
    """With two samples per batch the leaky baseline halves the gradient; the harness sees it,
    and the proper EMA (value held before the batch) passes the same check."""
    graph = Chain()
    baseline = _leaky_ema(0.0) if leaky else dice.ema_baseline(0.0)
    state = _warm_on_graph(graph, dice.ema_baseline(0.0), steps=1)
    est = mc_derivatives(graph, 1, seed=5, chunks=4096, n=2, baseline=baseline, state=state)
    z = zscores(est, exact_derivative(graph, 1))
    assert (z.abs().max() > z_critical(z.numel())) == leaky, z


@pytest.mark.parametrize("order", [2, 3])
def test_state_baselines_cut_higher_order_variance(order):
    """Costs with a constant offset of 100: a warmed-up EMA and leave-one-out remove it from
    the Hessian (and third derivative) estimates."""
    graph = Chain(offset=100.0)

    def total_variance(baseline="none", state=None):
        est = mc_derivatives(
            graph, order, seed=11, chunks=CHUNKS, n=64, baseline=baseline, state=state
        )
        return est.var(0).sum().item()

    none = total_variance()
    for name in BASELINES:
        baseline, state = _state_for(graph, name)
        assert none / total_variance(baseline, state) > 100, name
