"""Shapes that hurt, shared by the kernel tests: (id, V, U, D, ids shape, how ids are drawn)."""

import itertools

import pytest
import torch

from pema_triton.ops import build_remap

CASES = [
    ("D1", 64, 10, 1, (3, 17), "random"),
    ("D97", 300, 37, 97, (4, 33), "random"),
    ("D128", 1000, 200, 128, (2, 257), "random"),
    ("N1", 50, 7, 33, (1,), "random"),
    ("same-id", 80, 9, 40, (600,), "same"),
    ("ids-0-and-V-1", 500, 20, 24, (5, 9), "ends"),
    ("U1", 40, 1, 16, (2, 11), "random"),
    ("U=V", 30, 30, 19, (7, 5), "random"),
]
CASE_IDS = [c[0] for c in CASES]


def tiered_grid(cases, case_ids, axes: dict[str, list], every: tuple[str, ...] = ()) -> list:
    """Every case crossed with every value of each axis, as `pytest.param`s: the fast tier runs each case once per
    value of the axes named in `every` and with one value of each other axis, rotating with the case's index (so
    each value still runs on some case); the rest of the grid is marked slow (`make test-all`).

    Args:
        cases: tuples of the case's parameters; case_ids: their names. axes: name -> values, in the order the test's
            parameters follow the case's.
    """
    names = list(axes)
    params = []
    for index, (case, case_id) in enumerate(zip(cases, case_ids)):
        for values in itertools.product(*axes.values()):
            fast = all(name in every or values[i] is axes[name][index % len(axes[name])]
                       for i, name in enumerate(names))
            label = "-".join([case_id, *(str(v).removeprefix("torch.") for v in values)])
            params.append(pytest.param(*case, *values, id=label, marks=() if fast else pytest.mark.slow))
    return params


def make_case(vocab_size, num_used, shape, how, id_dtype, device, seed=0):
    """Sorted used ids, the remap, and ids of `shape` drawn from the used set."""
    gen = torch.Generator().manual_seed(seed)
    if how == "ends":
        middle = torch.randperm(vocab_size - 2, generator=gen)[: num_used - 2] + 1
        used = torch.cat([torch.tensor([0, vocab_size - 1]), middle]).sort().values
    else:
        used = torch.randperm(vocab_size, generator=gen)[:num_used].sort().values
    picks = torch.randint(0, num_used, shape, generator=gen)
    if how == "same":
        picks.fill_(num_used // 2)
    ids = used[picks]
    if how == "ends":
        ids.view(-1)[:2] = torch.tensor([0, vocab_size - 1])
    return used.to(device), build_remap(used, vocab_size).to(device), ids.to(device=device, dtype=id_dtype)


def scatter_tolerance(grad_out: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype) -> dict[str, float]:
    """`assert_close` bounds on |kernel - reference| for a gradient scatter.

    Both accumulate in fp32 (fp64 for fp64), only in another order: a row summing k terms differs by at most
    about k * eps_acc * max|g| (atol). The final cast to `dtype` then rounds each side once: within one ulp of
    the result, i.e. eps(dtype) * |result| (rtol). The bound is on the actual result, not the worst-case sum:
    for 600 copies of one id in bf16 that is ~0.2 where k * max|g| * eps would allow ~20.
    """
    eps_acc = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    max_count = int(torch.unique(ids, return_counts=True)[1].max())
    max_grad = float(grad_out.abs().max())
    return {"atol": max_count * eps_acc * max_grad, "rtol": torch.finfo(dtype).eps}
