"""Shared test helpers: the torch.func transform grid, the compile check, saved tensors.

Test files build ``CASES`` of ``(f, ref)`` pairs, functions of the 6-vector ``THETA``: ``f``
uses dicefn, ``ref`` is the same computation in plain torch. ``TRANSFORMS`` applies every
transform to either, and the two results must agree.
"""

import torch
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

F64 = torch.float64
THETA = torch.tensor([0.3, -0.2, 0.5, 0.1, -0.4, 0.7], dtype=F64)
TANGENT = torch.tensor([1.0, -0.5, 0.25, 2.0, 0.0, -1.0], dtype=F64)
_BATCH = torch.stack([THETA, THETA * 2, -THETA])

TRANSFORMS = {
    "grad": lambda f: grad(f)(THETA),
    "jacrev": lambda f: jacrev(f)(THETA),
    "jacfwd": lambda f: jacfwd(f)(THETA),
    "hessian": lambda f: hessian(f)(THETA),
    "jacfwd(jacrev)": lambda f: jacfwd(jacrev(f))(THETA),
    "jacrev(jacrev)": lambda f: jacrev(jacrev(f))(THETA),
    "third_order": lambda f: jacfwd(jacfwd(jacrev(f)))(THETA),
    "jvp": lambda f: jvp(f, (THETA,), (TANGENT,))[1],
    "vmap": lambda f: vmap(f)(_BATCH),
    "vmap(grad)": lambda f: vmap(grad(f))(_BATCH),
}


def assert_compiles_like_eager(f):
    """``torch.compile(f, fullgraph=True)`` (no graph breaks) gives eager's value and gradient."""
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    t1, t2 = THETA.clone().requires_grad_(), THETA.clone().requires_grad_()
    out, ref = compiled(t1), f(t2)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out, t1)[0], torch.autograd.grad(ref, t2)[0])


def saved_storages(fn):
    """Sizes in bytes of the distinct storages autograd saves for backward while ``fn`` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return list(storages.values())
