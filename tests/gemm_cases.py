"""Random cases and the accuracy rule shared by the GPU-kernel tests (Triton and CUDA) of the four GEMM ops.

The rule is design §6's (flash-attention's): the kernel's error against a float64 reference may be at most twice
the error of the same computation done by plain PyTorch in the kernel's precision, plus one ulp (of the kernel's
dtype) of the result's magnitude.
"""
import torch

import sparsekern as sk
from sparsekern import reference


def stacked(*decorators):
    """One decorator for a stack the test files repeat: ``decorators`` applied as if written one above the other,
    in this order (so the test ids come out as with the written stack)."""
    def apply(test):
        for decorator in reversed(decorators):
            test = decorator(test)
        return test
    return apply


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=_gen(seed)).to(dtype=dtype, device=device)


def make_layout(shape, bs, density, seed, empty_rows=(), empty_cols=(), device="cpu"):
    grid = (-(-shape[0] // bs), -(-shape[1] // bs))
    mask = torch.ones(grid, dtype=torch.bool) if density >= 1.0 else torch.rand(grid, generator=_gen(seed)) < density
    for r in empty_rows:
        mask[r] = False
    for c in empty_cols:
        mask[:, c] = False
    return sk.BlockSparseLayout.from_block_mask(mask.to(device), bs, shape)


def random_values(layout, seed, dtype):
    """Random values everywhere, the padding of the last blocks included (the kernels must ignore it)."""
    bs = layout.block_size
    return randn(layout.nnz_blocks, bs, bs, seed=seed, dtype=dtype, device=layout.device)


def as_float64(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def assert_close_to_reference(op, args, out):
    """Checks a kernel's output `out` of `op` on `args` with the rule above; returns it."""
    same_precision = getattr(reference, op)(*args)
    exact = getattr(reference, op)(*as_float64(args))
    assert out.shape == exact.shape, f"{op}: shape {tuple(out.shape)} != {tuple(exact.shape)}"
    assert out.dtype == same_precision.dtype, f"{op}: dtype {out.dtype} != {same_precision.dtype}"
    assert out.device == same_precision.device
    if exact.numel() == 0:
        return out
    assert torch.isfinite(out).all(), f"{op}: non-finite values in the kernel's output"
    kernel_error = (out.double() - exact).abs().max().item()
    torch_error = (same_precision.double() - exact).abs().max().item()
    eps = torch.finfo(out.dtype).eps * exact.abs().max().item()
    assert kernel_error <= 2 * torch_error + eps, (
        f"{op}: kernel error {kernel_error:.3e} > 2 x torch error {torch_error:.3e} + {eps:.1e}")
    return out


def linear_args(shape, bs, density, dtype, seed, bias=True, device="cpu", **layout_kw):
    m, n, k = shape
    layout = make_layout((n, k), bs, density, seed, device=device, **layout_kw)
    values = random_values(layout, seed + 1, dtype)
    x = randn(m, k, seed=seed + 2, dtype=dtype, device=device)
    b = randn(n, seed=seed + 3, dtype=dtype, device=device) if bias else None
    return layout, (x, values, *layout.index_tensors(), n, b)


def dx_args(shape, bs, density, dtype, seed, device="cpu", **layout_kw):
    m, n, k = shape
    layout = make_layout((n, k), bs, density, seed, device=device, **layout_kw)
    values = random_values(layout, seed + 1, dtype)
    dy = randn(m, n, seed=seed + 2, dtype=dtype, device=device)
    return layout, (dy, values, *layout.index_tensors(), k)


def sddmm_args(shape, bs, density, dtype, seed, device="cpu", **layout_kw):
    m, n, k = shape
    layout = make_layout((n, k), bs, density, seed, device=device, **layout_kw)
    dy = randn(m, n, seed=seed + 2, dtype=dtype, device=device)
    x = randn(m, k, seed=seed + 3, dtype=dtype, device=device)
    return layout, (dy, x, *layout.index_tensors(), bs)


def error_problem(device="cpu"):
    """The valid arguments the CUDA glue's error cases (CUDA_ERRORS) start from: x [20, 30], dy [20, 40], the layout
    of W [40, 30] at block 16 (a 3 x 2 grid, half of it stored), its values and a bias."""
    layout, args = linear_args((20, 40, 30), 16, 0.5, torch.float32, seed=19, device=device)
    dy = randn(20, 40, seed=25, dtype=torch.float32, device=device)
    return dict(x=args[0], dy=dy, values=args[1], index=list(args[2:8]), bias=args[9], n=40, k=30)


def _replace(items, at, value):
    items = list(items)
    items[at] = value
    return items


def _linear(p, **bad):
    """bsr_linear's arguments with some replaced (x, values, index: a {position: tensor} dict, n, bias)."""
    index = p["index"]
    for at, tensor in bad.pop("index", {}).items():
        index = _replace(index, at, tensor)
    q = {**p, **bad}
    return (q["x"], q["values"], *index, q["n"], q["bias"])


def _dx(p, **bad):
    q = {**p, **bad}
    return (q["dy"], q["values"], *q["index"], q["k"])


def _sddmm(p, bs=16, **bad):
    q = {**p, **bad}
    return (q["dy"], q["x"], *q["index"], bs)


# One bad argument per call of a native CUDA GEMM op: {id: p -> (op, args, a fragment of the error message)}, p
# from error_problem. Each must raise before anything is read or launched (tests/test_cuda_kernels.py runs them on
# the GPU, and on fake CUDA tensors without one).
CUDA_ERRORS = {
    "linear-x-float64": lambda p: ("bsr_linear", _linear(p, x=p["x"].double()), "float64"),
    "linear-x-on-cpu": lambda p: ("bsr_linear", _linear(p, x=p["x"].cpu()), "x must be a CUDA tensor"),
    "linear-x-1d": lambda p: ("bsr_linear", _linear(p, x=p["x"][0]), "x must be 2-D"),
    "linear-values-float16": lambda p: ("bsr_linear", _linear(p, values=p["values"].half()), "values has dtype"),
    "linear-values-2d": lambda p: ("bsr_linear", _linear(p, values=p["values"][0]), "values must be 3-D"),
    "linear-values-on-cpu": lambda p: ("bsr_linear", _linear(p, values=p["values"].cpu()), "values is on cpu"),
    "linear-values-block-24": lambda p: ("bsr_linear", _linear(p, values=p["values"][:, :12, :12].repeat(1, 2, 2)),
                                         "values must be [nnz, bs, bs]"),
    "linear-row_ptr-int64": lambda p: ("bsr_linear", _linear(p, index={0: p["index"][0].long()}),
                                       "row_ptr must be int32"),
    "linear-col_idx-on-cpu": lambda p: ("bsr_linear", _linear(p, index={1: p["index"][1].cpu()}),
                                        "col_idx is on cpu"),
    "linear-perm-2d": lambda p: ("bsr_linear", _linear(p, index={5: p["index"][5].view(1, -1)}), "perm must be 1-D"),
    "linear-out_features-not-the-layouts": lambda p: ("bsr_linear", _linear(p, n=80, bias=None), "row_ptr must have"),
    "linear-out_features-0": lambda p: ("bsr_linear", _linear(p, n=0), "out_features must be"),
    "linear-out_features-huge": lambda p: ("bsr_linear", _linear(p, n=2 ** 40, bias=None),
                                          "out_features must be in [1, 2^31)"),
    "linear-bias-short": lambda p: ("bsr_linear", _linear(p, bias=p["bias"][:-1]), "bias must have shape"),
    "linear-bias-float16": lambda p: ("bsr_linear", _linear(p, bias=p["bias"].half()), "bias has dtype"),
    "dx-dy-float64": lambda p: ("bsr_linear_dx", _dx(p, dy=p["dy"].double()), "float64"),
    "dx-dy-on-cpu": lambda p: ("bsr_linear_dx", _dx(p, dy=p["dy"].cpu()), "dy must be a CUDA tensor"),
    "dx-dy-features-not-the-layouts": lambda p: ("bsr_linear_dx", _dx(p, dy=p["x"]), "row_ptr must have"),
    "dx-in_features-not-the-layouts": lambda p: ("bsr_linear_dx", _dx(p, k=60), "col_ptr must have"),
    "dx-in_features-0": lambda p: ("bsr_linear_dx", _dx(p, k=0), "in_features must be"),
    "sddmm-dy-rows": lambda p: ("bsr_sddmm", _sddmm(p, dy=p["dy"][:5]), "dy has 5 rows but x has 20"),
    "sddmm-x-float16": lambda p: ("bsr_sddmm", _sddmm(p, x=p["x"].half()), "x has dtype"),
    "sddmm-x-on-cpu": lambda p: ("bsr_sddmm", _sddmm(p, x=p["x"].cpu()), "x must be a CUDA tensor"),
    "sddmm-block_size-24": lambda p: ("bsr_sddmm", _sddmm(p, bs=24), "block_size must be"),
    "sddmm-block_size-not-the-layouts": lambda p: ("bsr_sddmm", _sddmm(p, bs=32), "row_ptr must have"),
    "scores-float64": lambda p: ("block_grad_scores", (p["dy"].double(), p["x"].double(), 16), "float64"),
    "scores-dy-3d": lambda p: ("block_grad_scores", (p["dy"][None], p["x"], 16), "dy must be 2-D"),
    "scores-x-rows": lambda p: ("block_grad_scores", (p["dy"], p["x"][:5], 16), "dy has 20 rows but x has 5"),
}
