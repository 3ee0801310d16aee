import pytest
import torch
from torch.func import grad

import dicefn as dice


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_is_exactly_one(dtype):
    tau = torch.tensor([5.0, -3.0, 1e6, -1e6], dtype=dtype, requires_grad=True)
    out = dice.magic_box(tau)
    assert out.dtype == dtype
    assert torch.equal(out, torch.ones_like(tau))


def test_derivatives_follow_oeis_a000085():
    """d^n/dtau^n magic_box(tau**2 / 2) at tau = 1 counts involutions: OEIS A000085."""
    fun = lambda tau: dice.magic_box(tau**2 / 2)  # noqa: E731
    values = []
    for _ in range(10):
        values.append(fun(torch.tensor(1.0, dtype=torch.float64)))
        fun = grad(fun)
    expected = torch.tensor([1, 1, 2, 4, 10, 26, 76, 232, 764, 2620], dtype=torch.float64)
    torch.testing.assert_close(torch.stack(values), expected)


def test_rejects_non_float():
    with pytest.raises(TypeError, match="floating-point"):
        dice.magic_box(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        dice.magic_box(1.0)
