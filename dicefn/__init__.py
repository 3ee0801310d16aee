"""dicefn: functional DiCE estimators for derivatives of expectations, any order, in PyTorch.

Import as ``import dicefn as dice``. Every function is pure and composes with
``torch.func.grad``, ``vmap``, ``jacrev``, ``jacfwd``, ``hessian`` and ``torch.compile``.
"""

from dicefn import lm, random
from dicefn._src.baselines import (
    Baseline,
    BaselineInitFn,
    BaselineUpdateFn,
    EmaState,
    LeaveOneOutState,
    ema_baseline,
    leave_one_out,
)
from dicefn._src.dice import (
    baseline_term,
    batch_baseline_term,
    cost_node,
    magic_box,
)
from dicefn._src.nodes import (
    logp,
    logp_bernoulli,
    logp_categorical,
    logp_normal,
    sample_bernoulli,
    sample_categorical,
    sample_normal,
)
from dicefn._src.sequences import (
    discounted_cumsum,
    gae,
    loaded_dice,
    returns,
)

__version__ = "0.1.0"

__all__ = [
    "Baseline",
    "BaselineInitFn",
    "BaselineUpdateFn",
    "EmaState",
    "LeaveOneOutState",
    "baseline_term",
    "batch_baseline_term",
    "cost_node",
    "discounted_cumsum",
    "ema_baseline",
    "gae",
    "leave_one_out",
    "lm",
    "loaded_dice",
    "logp",
    "logp_bernoulli",
    "logp_categorical",
    "logp_normal",
    "magic_box",
    "random",
    "returns",
    "sample_bernoulli",
    "sample_categorical",
    "sample_normal",
]
