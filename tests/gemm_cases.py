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
