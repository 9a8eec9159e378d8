"""The native CPU kernels (torch.ops.sparsekern.native_*, csrc/cpu) against sparsekern.reference.

fp32 uses the flash-attention rule against an fp64 reference: our error is at most 2x that of torch's own
fp32 dense computation (plus a tiny epsilon). fp64 must agree to rounding. Every instruction set this CPU
has (SPARSEKERN_CPU_ISA) is checked on the forward, so the AVX2 and portable fallbacks stay correct too.
"""
import resource
import threading

import pytest
import torch

import sparsekern as sk
from sparsekern import _native, reference

pytestmark = pytest.mark.skipif(not _native.LOADED, reason=f"sparsekern._C not loaded: {_native.LOAD_ERROR}")

BLOCK_SIZES = [16, 32, 64, 128]
# (M, N, K): none a multiple of any block size
SHAPES = [(1, 5, 7), (37, 70, 130), (129, 257, 300)]
DENSITIES = [0.0, 0.35, 1.0]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _layout(shape, bs, density, seed, empty_row=False):
    """Random layout on the padded grid of an [N, K] matrix; optionally with block-row 0 empty."""
    grid = (-(-shape[0] // bs), -(-shape[1] // bs))
    mask = torch.rand(grid, generator=_gen(seed)) < density if density < 1.0 else torch.ones(grid, dtype=torch.bool)
    if empty_row:
        mask[0] = False
    return sk.BlockSparseLayout.from_block_mask(mask, bs, shape)


def _problem(shape, bs, density, seed=0, dtype=torch.float32, empty_row=False):
    m, n, k = shape
    layout = _layout((n, k), bs, density, seed, empty_row)
    g = _gen(seed + 1)
    values = torch.randn(layout.nnz_blocks, bs, bs, generator=g).to(dtype)  # non-zero in the padding too
    x = torch.randn(m, k, generator=g).to(dtype)
    dy = torch.randn(m, n, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    return layout, values, x, dy, bias


def _call(op, *args):
    return getattr(torch.ops.sparsekern, f"native_{op}")(*args)


def _run_all(layout, values, x, dy, bias):
    """{op: (native result, reference fn taking the same args)} for the four GEMM ops."""
    n, k = layout.shape
    bs = layout.block_size
    idx = layout.index_tensors()
    return {
        "bsr_linear": ((x, values, *idx, n, bias), reference.bsr_linear),
        "bsr_linear_dx": ((dy, values, *idx, k), reference.bsr_linear_dx),
        "bsr_sddmm": ((dy, x, *idx, bs), reference.bsr_sddmm),
        "block_grad_scores": ((dy, x, bs), reference.block_grad_scores),
    }


def _as64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _check_fp32(op, args, ref_fn):
    ours = _call(op, *args)
    oracle = ref_fn(*_as64(args))
    plain = ref_fn(*args)  # torch's own fp32 dense computation of the same thing
    assert ours.shape == oracle.shape and ours.dtype == plain.dtype
    if ours.numel() == 0:
        return
    ours_err = (ours.double() - oracle).abs().max().item()
    torch_err = (plain.double() - oracle).abs().max().item()
    scale = oracle.abs().max().item()
    assert ours_err <= 2 * torch_err + 1e-6 * (1 + scale), (op, ours_err, torch_err)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_fp32_matches_reference(bs, shape, density):
    problem = _problem(shape, bs, density, seed=hash((bs, shape, density)) % 1000)
    for op, (args, ref_fn) in _run_all(*problem).items():
        _check_fp32(op, args, ref_fn)


@pytest.mark.parametrize("bs", [16, 32])
def test_fp64_matches_reference(bs):
    for shape, density in [((37, 70, 130), 0.5), ((5, 33, 17), 1.0), ((9, 40, 40), 0.0)]:
        problem = _problem(shape, bs, density, seed=3, dtype=torch.float64)
        for op, (args, ref_fn) in _run_all(*problem).items():
            ours, oracle = _call(op, *args), ref_fn(*args)
            assert ours.dtype == torch.float64
            torch.testing.assert_close(ours, oracle, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
def test_every_instruction_set(isa, monkeypatch):
    supported = {"avx512": torch.backends.cpu.get_cpu_capability() in ("AVX512",), "avx2": True, "scalar": True}
    monkeypatch.setenv("SPARSEKERN_CPU_ISA", isa)
    try:
        _call("bsr_linear", *_run_all(*_problem((3, 16, 16), 16, 1.0))["bsr_linear"][0])
    except RuntimeError as error:
        assert "does not support" in str(error) and not supported[isa]
        pytest.skip(f"this CPU has no {isa}")
    for bs in BLOCK_SIZES:
        problem = _problem((45, 200, 190), bs, 0.5, seed=bs)
        for op, (args, ref_fn) in _run_all(*problem).items():
            _check_fp32(op, args, ref_fn)


def test_empty_block_rows_and_padding_are_zero():
    layout, values, x, dy, bias = _problem((20, 70, 50), 32, 1.0, empty_row=True)
    idx = layout.index_tensors()
    y = _call("bsr_linear", x, values, *idx, 70, None)
    assert torch.equal(y[:, :32], torch.zeros(20, 32))  # block-row 0 is empty
    y_bias = _call("bsr_linear", x, values, *idx, 70, bias)
    assert torch.equal(y_bias[:, :32], bias[:32].expand(20, 32))
    grads = _call("bsr_sddmm", dy, x, *idx, 32)
    # last block-row covers features 64..95 of N = 70, last block-column 32..63 of K = 50
    last_rows = layout.coo_row == 2
    last_cols = layout.col_idx == 1
    assert torch.equal(grads[last_rows][:, 70 - 64:, :], torch.zeros_like(grads[last_rows][:, 70 - 64:, :]))
    assert torch.equal(grads[last_cols][:, :, 50 - 32:], torch.zeros_like(grads[last_cols][:, :, 50 - 32:]))


def test_zero_rows_and_nnz_zero():
    layout, values, x, dy, bias = _problem((0, 40, 30), 16, 0.5)
    idx = layout.index_tensors()
    assert _call("bsr_linear", x, values, *idx, 40, bias).shape == (0, 40)
    assert torch.equal(_call("bsr_sddmm", dy, x, *idx, 16), torch.zeros(layout.nnz_blocks, 16, 16))
    assert torch.equal(_call("block_grad_scores", dy, x, 16), torch.zeros(3, 2))
    layout, values, x, dy, bias = _problem((7, 40, 30), 16, 0.0)
    assert layout.nnz_blocks == 0
    assert torch.equal(_call("bsr_linear", x, values, *layout.index_tensors(), 40, bias), bias.expand(7, 40))
    assert _call("bsr_sddmm", dy, x, *layout.index_tensors(), 16).shape == (0, 16, 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_fp32(dtype):
    problem = _problem((33, 70, 90), 32, 0.5, seed=5, dtype=dtype)
    for op, (args, ref_fn) in _run_all(*problem).items():
        ours = _call(op, *args)
        oracle = ref_fn(*_as64(args))
        expected_dtype = torch.float32 if op == "block_grad_scores" else dtype
        assert ours.dtype == expected_dtype
        # one rounding of an fp32 result to the half dtype
        eps = torch.finfo(expected_dtype).eps
        assert ((ours.double() - oracle).abs() <= eps * oracle.abs() + 1e-5 * (1 + oracle.abs().max())).all(), op


def test_bit_identical_across_thread_counts():
    threads = torch.get_num_threads()
    layout, values, x, dy, bias = _problem((300, 260, 290), 32, 0.4, seed=11)
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append({op: _call(op, *args) for op, (args, _) in _run_all(layout, values, x, dy, bias).items()})
    finally:
        torch.set_num_threads(threads)
    for op in results[0]:
        assert torch.equal(results[0][op], results[1][op]), op


# Outputs of 1 MB and more come from a pool of reused buffers (csrc/cpu/output_pool.cpp).

def _pooled_problem(seed):
    return _problem((520, 600, 70), 32, 0.5, seed=seed)  # [520, 600] fp32 outputs: 1.2 MB


def test_a_freed_output_is_reused_and_fully_overwritten():
    layout, values, x, dy, bias = _pooled_problem(seed=21)
    idx = layout.index_tensors()
    first = _call("bsr_linear", x, values, *idx, 600, bias)
    address = first.data_ptr()
    first.fill_(float("nan"))  # whatever stays behind in the buffer must not show through
    del first
    x2 = torch.randn_like(x)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = _call("bsr_linear", x2, values, *idx, 600, bias)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    assert second.data_ptr() == address
    # its pages were already mapped: the address alone proves little, as malloc may give it back too
    assert faults < second.numel() * 4 // 4096 // 4
    torch.testing.assert_close(second, reference.bsr_linear(x2, values, *idx, 600, bias), rtol=1e-5, atol=1e-4)
    # a buffer still in use is never handed out again
    third = _call("bsr_linear", x, values, *idx, 600, bias)
    assert third.data_ptr() != second.data_ptr()
    assert torch.equal(second, _call("bsr_linear", x2, values, *idx, 600, bias))


def test_a_pooled_output_resizes_and_shares_like_any_tensor():
    layout, values, x, dy, bias = _pooled_problem(seed=22)
    y = _call("bsr_linear", x, values, *layout.index_tensors(), 600, bias)
    expected = y.clone()
    y.resize_(2 * y.numel())
    assert torch.equal(y[:expected.numel()], expected.flatten())
    z = _call("bsr_linear", x, values, *layout.index_tensors(), 600, bias)
    z.share_memory_()
    assert z.is_shared() and torch.equal(z, expected)


def test_pooled_outputs_may_be_freed_on_other_threads():
    layout, values, x, dy, bias = _pooled_problem(seed=23)
    idx = layout.index_tensors()
    expected = _call("bsr_linear", x, values, *idx, 600, bias)
    outputs = [_call("bsr_linear", x, values, *idx, 600, bias) for _ in range(8)]
    freeing = threading.Thread(target=outputs.clear)
    freeing.start()
    fresh = [_call("bsr_linear", x, values, *idx, 600, bias) for _ in range(8)]
    freeing.join()
    assert all(torch.equal(out, expected) for out in fresh)


def test_dispatch_picks_cpu_backend(monkeypatch):
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    for op in ("bsr_linear", "bsr_linear_dx", "bsr_sddmm", "block_grad_scores"):
        assert sk.ops.select_backend(op, torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("op", ["bsr_linear", "bsr_linear_dx", "bsr_sddmm"])
def test_gradcheck_through_public_ops(op, monkeypatch):
    monkeypatch.setenv("SPARSEKERN_BACKEND", "cpu")
    layout = _layout((20, 37), 16, 0.6, seed=2)
    g = _gen(4)
    values = torch.randn(layout.nnz_blocks, 16, 16, generator=g, dtype=torch.float64)
    values = (values * layout.padding_mask(torch.float64)).requires_grad_()
    x = torch.randn(6, 37, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(6, 20, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(20, generator=g, dtype=torch.float64, requires_grad=True)
    if op == "bsr_linear":
        fn, inputs = (lambda x, v, b: sk.ops.bsr_linear(x, layout, v, b)), (x, values, bias)
    elif op == "bsr_linear_dx":
        fn, inputs = (lambda d, v: sk.ops.bsr_linear_dx(d, layout, v)), (dy, values)
    else:
        fn, inputs = (lambda d, x: sk.ops.bsr_sddmm(d, x, layout)), (dy, x)
    assert torch.autograd.gradcheck(fn, inputs)


def test_errors_name_the_argument():
    layout, values, x, dy, bias = _problem((4, 40, 30), 16, 0.5)
    idx = layout.index_tensors()
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        _call("bsr_linear", x[None], values, *idx, 40, None)
    with pytest.raises(RuntimeError, match="values has dtype"):
        _call("bsr_linear", x, values.double(), *idx, 40, None)
    with pytest.raises(RuntimeError, match="row_ptr must have"):
        _call("bsr_linear", x, values, *idx, 80, None)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        _call("bsr_linear", x, values, *idx, 40, bias[:3])
    with pytest.raises(RuntimeError, match="x must be float32, float64, float16 or bfloat16"):
        _call("bsr_linear", x.int(), values.int(), *idx, 40, None)
    with pytest.raises(RuntimeError, match="block_size must be"):
        _call("bsr_sddmm", dy, x, *idx, 24)
    bad_cols = layout.col_idx.clone()
    if bad_cols.numel():
        bad_cols[0] = 99
        with pytest.raises(RuntimeError, match="col_idx"):
            _call("bsr_linear", x, values, layout.row_ptr, bad_cols, *idx[2:], 40, None)
    with pytest.raises(RuntimeError, match="col_idx must be int32"):
        _call("bsr_linear", x, values, layout.row_ptr, layout.col_idx.long(), *idx[2:], 40, None)


# ----------------------------------------------------------------------------------------------
# Convolution (SparseConv2d's native path) against nn.Conv2d with the same dense filter

CONV_CASES = [  # in, out, kernel, stride, padding, dilation, block, size
    (32, 64, 3, 1, 1, 1, 32, 9),
    (64, 40, 3, 2, 1, 1, 32, 10),
    (32, 32, 1, 2, 0, 1, 16, 7),
    (64, 64, 3, 1, "same", 2, 64, 8),
    (16, 17, 5, 3, 2, 1, 16, 11),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_native_conv_matches_conv2d(case, monkeypatch):
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    cin, cout, kernel, stride, padding, dilation, bs, size = case
    torch.manual_seed(0)
    layer = sk.SparseConv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, sparsity=0.5,
                            block_size=bs)
    dense = layer.to_dense()
    x = torch.randn(3, cin, size, size, requires_grad=True)
    assert layer._implicit_gemm_applies(x)
    x_dense = x.detach().clone().requires_grad_()
    y, y_dense = layer(x), dense(x_dense)
    torch.testing.assert_close(y, y_dense, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(y_dense)
    y.backward(grad)
    y_dense.backward(grad)
    torch.testing.assert_close(x.grad, x_dense.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad, rtol=1e-4, atol=1e-4)
    weight_grad = layer._weight_to_matrix(dense.weight.grad)
    expected = reference.dense_to_blocks(weight_grad, layer.layout.coo_row, layer.layout.col_idx, bs)
    torch.testing.assert_close(layer.values.grad, expected, rtol=1e-4, atol=1e-3)


CONV_GEOMETRY = dict(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), output_size=(3, 3))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_conv_op_gradcheck(backend, monkeypatch):
    monkeypatch.setenv("SPARSEKERN_BACKEND", backend)
    torch.manual_seed(2)
    layer = sk.SparseConv2d(16, 20, 3, stride=2, padding=1, sparsity=0.3, block_size=16).double()
    x = torch.randn(2, 5, 5, 16, dtype=torch.float64, requires_grad=True)  # NHWC
    assert layer._implicit_gemm_applies(x.permute(0, 3, 1, 2)) == (backend == "cpu")
    assert torch.autograd.gradcheck(
        lambda x, v, b: sk.ops.bsr_conv2d(x, layer.layout, v, b, **CONV_GEOMETRY), (x, layer.values, layer.bias))


def test_conv_ops_opcheck():
    torch.manual_seed(3)
    layer = sk.SparseConv2d(16, 20, 3, stride=2, padding=1, sparsity=0.3, block_size=16)
    x = torch.randn(2, 5, 5, 16, requires_grad=True)
    g = CONV_GEOMETRY
    index = layer.layout.index_tensors()
    geometry = [list(g["kernel_size"]), list(g["stride"]), list(g["padding"]), list(g["dilation"])]
    torch.library.opcheck(torch.ops.sparsekern.bsr_conv2d.default,
                          (x, layer.values, *index, 20, layer.bias, *geometry, list(g["output_size"])))
    dy = torch.randn(2, 3, 3, 20)
    torch.library.opcheck(torch.ops.sparsekern.bsr_conv2d_dgrad.default,
                          (dy, layer.values.detach(), *index, 16, [5, 5], *geometry))
    torch.library.opcheck(torch.ops.sparsekern.bsr_conv2d_wgrad.default, (dy, x.detach(), *index, 16, *geometry))


def test_native_conv_ops_match_reference():
    torch.manual_seed(4)
    layer = sk.SparseConv2d(32, 40, 3, stride=2, padding=1, dilation=1, sparsity=0.5, block_size=16)
    index = layer.layout.index_tensors()
    g = CONV_GEOMETRY
    geometry = [list(g["kernel_size"]), list(g["stride"]), list(g["padding"]), list(g["dilation"])]
    x, dy = torch.randn(3, 6, 5, 32, dtype=torch.float64), torch.randn(3, 3, 3, 40, dtype=torch.float64)
    values, bias = layer.values.detach().double(), layer.bias.detach().double()
    pairs = [
        (torch.ops.sparsekern.native_bsr_conv2d(x, values, *index, 40, bias, *geometry, [3, 3]),
         reference.bsr_conv2d(x, values, *index, 40, bias, *geometry, [3, 3])),
        (torch.ops.sparsekern.native_bsr_conv2d_dgrad(dy, values, *index, 32, [6, 5], *geometry),
         reference.bsr_conv2d_dgrad(dy, values, *index, 32, [6, 5], *geometry)),
        (torch.ops.sparsekern.native_bsr_conv2d_wgrad(dy, x, *index, 16, *geometry),
         reference.bsr_conv2d_wgrad(dy, x, *index, 16, *geometry)),
        (torch.ops.sparsekern.native_bsr_conv2d_grad_scores(dy, x, 16, *geometry),
         reference.bsr_conv2d_grad_scores(dy, x, 16, *geometry)),
    ]
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CONV_CASES)
def test_native_conv_grad_scores_match_reference(case):
    cin, cout, kernel, stride, padding, dilation, bs, size = case
    torch.manual_seed(5)
    layer = sk.SparseConv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, block_size=bs)
    left, _, top, _ = layer._pad_lrtb
    x = torch.randn(3, size, size, cin)
    out_size = layer(x.permute(0, 3, 1, 2)).shape[2:]
    dy = torch.randn(3, *out_size, cout)
    geometry = [[kernel, kernel], [stride, stride], [top, left], [dilation, dilation]]
    with_threads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with_threads.append(torch.ops.sparsekern.native_bsr_conv2d_grad_scores(dy, x, bs, *geometry))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(with_threads[0], with_threads[1])
    torch.testing.assert_close(with_threads[0], reference.bsr_conv2d_grad_scores(dy, x, bs, *geometry),
                               rtol=1e-4, atol=1e-4)


def test_conv_bit_identical_across_thread_counts():
    threads = torch.get_num_threads()
    torch.manual_seed(1)
    layer = sk.SparseConv2d(64, 64, 3, stride=2, padding=1, sparsity=0.5, block_size=32)
    x = torch.randn(2, 64, 12, 12, requires_grad=True)
    grads = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x.grad = None
            layer.values.grad = None
            y = layer(x)
            y.backward(torch.ones_like(y))
            grads.append((y.detach(), x.grad.clone(), layer.values.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_conv_reference_backend_skips_native(monkeypatch):
    monkeypatch.setenv("SPARSEKERN_BACKEND", "reference")
    layer = sk.SparseConv2d(32, 32, 3, padding=1, block_size=32)
    assert not layer._implicit_gemm_applies(torch.randn(1, 32, 4, 4))
