"""Bad input to a native op raises an error that names the tensor; it never crashes the process.

Every native entry point checks device, dtype, rank, shape, contiguity, index dtype and the layout's consistency
before it touches a data pointer. The CPU kernels are called directly; the CUDA kernels are reached without a GPU
by redispatching to their CUDA kernel with CPU tensors, which each must refuse by name before anything else
(on the H200 two error tests crashed their process, so a crash here must fail CI, not a GPU run).
"""
import re

import pytest
import torch

import sparsekern as sk
from sparsekern import _native

pytestmark = pytest.mark.skipif(not _native.LOADED, reason=f"sparsekern._C not loaded: {_native.LOAD_ERROR}")

N, K, M, BS = 40, 48, 6, 16
GEOMETRY = [[3, 3], [1, 1], [1, 1], [1, 1]]  # kernel_size, stride, padding, dilation
C, H, W = 16, 5, 4  # conv: K = 3 * 3 * 16


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _layout(shape):
    grid = (-(-shape[0] // BS), -(-shape[1] // BS))
    mask = torch.rand(grid, generator=_gen(1)) < 0.6
    mask[0, 0] = True
    return sk.BlockSparseLayout.from_block_mask(mask, BS, shape)


LIN = _layout((N, K))
CONV = _layout((N, 9 * C))


def _randn(*shape):
    return torch.randn(*shape, generator=_gen(sum(shape)))


def valid_args(op):
    """Valid arguments of ``native_<op>`` on CPU tensors, as a dict (call order kept)."""
    lin_values = _randn(LIN.nnz_blocks, BS, BS)
    conv_values = _randn(CONV.nnz_blocks, BS, BS)
    lin_index = dict(zip(sk.ops.LAYOUT_ARGS, LIN.index_tensors()))
    conv_index = dict(zip(sk.ops.LAYOUT_ARGS, CONV.index_tensors()))
    kernel_size, stride, padding, dilation = GEOMETRY
    geometry = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation)
    return {
        "bsr_linear": dict(x=_randn(M, K), values=lin_values, **lin_index, out_features=N, bias=_randn(N)),
        "bsr_linear_dx": dict(dy=_randn(M, N), values=lin_values, **lin_index, in_features=K),
        "bsr_sddmm": dict(dy=_randn(M, N), x=_randn(M, K), **lin_index, block_size=BS),
        "block_grad_scores": dict(dy=_randn(M, N), x=_randn(M, K), block_size=BS),
        "bsr_conv2d": dict(x=_randn(2, H, W, C), values=conv_values, **conv_index, out_channels=N, bias=None,
                           **geometry, output_size=[H, W]),
        "bsr_conv2d_dgrad": dict(dy=_randn(2, H, W, N), values=conv_values, **conv_index, in_channels=C,
                                 input_size=[H, W], **geometry),
        "bsr_conv2d_wgrad": dict(dy=_randn(2, H, W, N), x=_randn(2, H, W, C), **conv_index, block_size=BS,
                                 **geometry),
        "bsr_conv2d_grad_scores": dict(dy=_randn(2, H, W, N), x=_randn(2, H, W, C), block_size=BS, **geometry),
        "build_layout_index_": dict(block_mask=LIN.to_block_mask(),
                                    **{k: v.clone() for k, v in lin_index.items()}),
        "masked_sgd_": dict(param=lin_values.clone(), grad=_randn(*lin_values.shape), momentum_buffer=None,
                            master=None, step=torch.zeros((), dtype=torch.int64), grad_scale=None,
                            inv_loss_scale=None, found_inf=None, lr=0.1, momentum=0.0, dampening=0.0,
                            weight_decay=0.0, nesterov=False, decoupled_weight_decay=False),
    }[op]


def _native_op(op):
    return getattr(torch.ops.sparsekern, f"native_{op}").default


def _with(op, **changes):
    args = valid_args(op)
    args.update(changes)
    return list(args.values())


def _bad_index(name, edit, op="bsr_linear"):
    index = dict(zip(sk.ops.LAYOUT_ARGS, (LIN if op == "bsr_linear" else CONV).index_tensors()))
    return {name: edit(index[name].clone())}


def _set(position, value):
    def edit(t):
        t[position] = value
        return t
    return edit


# (op, {argument: bad value}, the message it must raise)
CPU_CASES = {
    "linear x 3-D": ("bsr_linear", {"x": _randn(1, M, K)}, "x must be 2-D"),
    "linear x int": ("bsr_linear", {"x": torch.zeros(M, K, dtype=torch.int32)}, "x must be float32"),
    "linear x features": ("bsr_linear", {"x": _randn(M, K + 16)}, "col_ptr must have"),
    "linear values dtype": ("bsr_linear", {"values": _randn(LIN.nnz_blocks, BS, BS).double()}, "values has dtype"),
    "linear values not square": ("bsr_linear", {"values": _randn(LIN.nnz_blocks, BS, 8)}, "values must be"),
    "linear values 24": ("bsr_linear", {"values": _randn(LIN.nnz_blocks, 24, 24)}, "values must be"),
    "linear values count": ("bsr_linear", {"values": _randn(LIN.nnz_blocks + 1, BS, BS)}, "col_idx must have"),
    "linear bias shape": ("bsr_linear", {"bias": _randn(N + 1)}, "bias must have shape"),
    "linear bias dtype": ("bsr_linear", {"bias": _randn(N).half()}, "bias has dtype"),
    "linear out_features": ("bsr_linear", {"out_features": N + 16, "bias": None}, "row_ptr must have"),
    "linear out_features 0": ("bsr_linear", {"out_features": 0}, "out_features"),
    "row_ptr int64": ("bsr_linear", _bad_index("row_ptr", lambda t: t.long()), "row_ptr must be int32"),
    "col_idx float": ("bsr_linear", _bad_index("col_idx", lambda t: t.float()), "col_idx must be int32"),
    "perm 2-D": ("bsr_linear", _bad_index("perm", lambda t: t.view(1, -1)), "perm must be 1-D"),
    "row_idx strided": ("bsr_linear", _bad_index("row_idx", lambda t: torch.stack([t, t], 1)[:, 0]),
                        "row_idx must be contiguous"),
    "coo_row short": ("bsr_linear", _bad_index("coo_row", lambda t: t[:-1]), "coo_row must have"),
    "col_idx out of range": ("bsr_linear", _bad_index("col_idx", _set(0, 99)), "col_idx[0] = 99"),
    "col_idx negative": ("bsr_linear", _bad_index("col_idx", _set(0, -1)), "col_idx[0] = -1"),
    "row_ptr not from 0": ("bsr_linear", _bad_index("row_ptr", _set(0, 1)), "row_ptr must run from 0"),
    "coo_row wrong row": ("bsr_linear", _bad_index("coo_row", _set(0, 2)), "coo_row[0] must be 0"),
    "row_idx out of range": ("bsr_linear", _bad_index("row_idx", _set(0, 77)), "row_idx[0] = 77"),
    "perm out of range": ("bsr_linear", _bad_index("perm", _set(0, 1000)), "perm[0] = 1000"),
    "col_ptr decreasing": ("bsr_linear", _bad_index("col_ptr", _set(1, -5)), "col_ptr must be non-decreasing"),
    "dx dy features": ("bsr_linear_dx", {"dy": _randn(M, N + 16)}, "row_ptr must have"),
    "dx in_features": ("bsr_linear_dx", {"in_features": -3}, "in_features"),
    "sddmm rows": ("bsr_sddmm", {"dy": _randn(M + 1, N)}, "rows"),
    "sddmm x dtype": ("bsr_sddmm", {"x": _randn(M, K).double()}, "x has dtype"),
    "sddmm block size": ("bsr_sddmm", {"block_size": 24}, "block_size must be"),
    "scores block size": ("block_grad_scores", {"block_size": 8}, "block_size must be"),
    "scores x 1-D": ("block_grad_scores", {"x": _randn(K)}, "x must be 2-D"),
    "conv x 3-D": ("bsr_conv2d", {"x": _randn(H, W, C)}, "x must be 4-D NHWC"),
    "conv channels": ("bsr_conv2d", {"x": _randn(2, H, W, C + 16)}, "col_ptr must have"),
    "conv stride 0": ("bsr_conv2d", {"stride": [0, 1]}, "stride must be positive"),
    "conv padding negative": ("bsr_conv2d", {"padding": [-1, 0]}, "padding must be non-negative"),
    "conv kernel 3 entries": ("bsr_conv2d", {"kernel_size": [3, 3, 3]}, "kernel_size, stride, padding and dilation"),
    "conv output_size": ("bsr_conv2d", {"output_size": [0, W]}, "output_size must be two positive sizes"),
    "conv bias shape": ("bsr_conv2d", {"bias": _randn(N - 1)}, "bias must have shape"),
    "dgrad input_size": ("bsr_conv2d_dgrad", {"input_size": [H]}, "input_size must be two positive sizes"),
    "dgrad dy 2-D": ("bsr_conv2d_dgrad", {"dy": _randn(H, N)}, "dy must be 4-D NHWC"),
    "wgrad batch": ("bsr_conv2d_wgrad", {"x": _randn(3, H, W, C)}, "batch"),
    "wgrad block size": ("bsr_conv2d_wgrad", {"block_size": 20}, "block_size must be"),
    "conv scores dtype": ("bsr_conv2d_grad_scores", {"x": _randn(2, H, W, C).half()}, "x has dtype"),
    "conv scores dilation": ("bsr_conv2d_grad_scores", {"dilation": [1, 0]}, "dilation must be positive"),
    "index mask dtype": ("build_layout_index_", {"block_mask": LIN.to_block_mask().int()}, "block_mask must be bool"),
    "index row_ptr length": ("build_layout_index_", {"row_ptr": torch.zeros(2, dtype=torch.int32)},
                             "row_ptr must have"),
    "sgd grad shape": ("masked_sgd_", {"grad": _randn(LIN.nnz_blocks, BS)}, "grad must have the shape of param"),
    "sgd step dtype": ("masked_sgd_", {"step": torch.zeros((), dtype=torch.int32)}, "step must be int64"),
    "sgd momentum without buffer": ("masked_sgd_", {"momentum": 0.9}, "momentum_buffer is required"),
}


@pytest.mark.parametrize("case", list(CPU_CASES))
def test_cpu_kernels_name_the_bad_argument(case):
    op, changes, message = CPU_CASES[case]
    _native_op(op)(*_with(op, **valid_args(op)))  # the valid arguments pass
    with pytest.raises(RuntimeError, match=re.escape(message)):
        _native_op(op)(*_with(op, **changes))


def test_cpu_kernels_check_the_transposed_index_against_the_blocks():
    """perm must map each block-column entry to a stored block of that column and row: a consistent-looking but
    wrong block-CSC index would give dX a silently wrong result."""
    index = dict(zip(sk.ops.LAYOUT_ARGS, (t.clone() for t in LIN.index_tensors())))
    column_blocks = (index["col_ptr"][1:] - index["col_ptr"][:-1]).tolist()
    first = next(c for c, n in enumerate(column_blocks) if n >= 1)
    row_idx = index["row_idx"].clone()
    row_idx[index["col_ptr"][first]] = (row_idx[index["col_ptr"][first]] + 1) % LIN.block_grid[0]
    with pytest.raises(RuntimeError, match="row_idx"):
        _native_op("bsr_linear_dx")(*_with("bsr_linear_dx", row_idx=row_idx))
    perm = index["perm"].clone()
    other = next(j for j in range(LIN.nnz_blocks) if LIN.col_idx[j] != first)
    perm[index["col_ptr"][first]] = other
    with pytest.raises(RuntimeError, match="perm"):
        _native_op("bsr_linear_dx")(*_with("bsr_linear_dx", perm=perm))


OPERAND = {"bsr_linear": "x", "bsr_linear_dx": "dy", "bsr_sddmm": "dy", "block_grad_scores": "dy",
           "bsr_conv2d": "x", "bsr_conv2d_dgrad": "dy", "bsr_conv2d_wgrad": "dy", "bsr_conv2d_grad_scores": "dy",
           "build_layout_index_": "block_mask", "masked_sgd_": "param"}


@pytest.mark.skipif(not _native.BUILD_INFO.get("cuda"), reason="sparsekern._C was built without CUDA kernels")
@pytest.mark.parametrize("op", sk.ops.OPS)
def test_cuda_kernels_refuse_cpu_tensors_by_name(op):
    """Each CUDA kernel, handed CPU tensors, names the first operand it checks: before any device query, guard or
    data pointer (reached here without a GPU by redispatching to the CUDA kernel)."""
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises(RuntimeError, match=f"{OPERAND[op]} must be a CUDA tensor, got cpu"):
        _native_op(op).redispatch(cuda_only, *valid_args(op).values())
