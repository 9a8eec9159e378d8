"""The four GEMM ops through the public wrappers in sk.ops, against dense masked oracles built in the tests."""
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from conftest import block_frobenius_norms, dense_matrix, randn, random_layout, random_values, small_model

# (M, N, K): rows of X, out_features, in_features; none but one a multiple of the block size
SHAPES = [(5, 37, 70), (1, 16, 16), (33, 64, 129), (7, 130, 40)]
BLOCK_SIZES = [16, 32]
DENSITIES = [0.0, 0.4, 1.0]
# fp32 and fp64 against an fp64 oracle with a fixed tolerance; fp16 by the flash-attention rule below
EXACT_DTYPES = [(torch.float32, 1e-4, 1e-5), (torch.float64, 1e-11, 1e-11)]
GEMM_OPS = ("bsr_linear", "bsr_linear_dx", "bsr_sddmm", "block_grad_scores")


def seed_of(*parts):
    """A fixed seed per test case (crc32, not hash(): stable across interpreters)."""
    return zlib.crc32(repr(parts).encode())


def problem(shape, block_size, density, dtype=torch.float32, requires_grad=False):
    """(layout, values, x, dy, bias) for Y[M, N] = X[M, K] Wᵀ, all random from fixed seeds."""
    m, n, k = shape
    seed = seed_of(shape, block_size, density)
    layout = random_layout((n, k), block_size, density, seed)
    values = random_values(layout, seed + 1, dtype, requires_grad)
    x = randn(m, k, seed=seed + 2, dtype=dtype, requires_grad=requires_grad)
    dy = randn(m, n, seed=seed + 3, dtype=dtype, requires_grad=requires_grad)
    bias = randn(n, seed=seed + 4, dtype=dtype, requires_grad=requires_grad)
    return layout, values, x, dy, bias


def padded_blocks(matrix, layout):
    """The stored blocks of a dense [N, K] matrix, zero in the padding: [nnz, bs, bs] (plain loops)."""
    bs = layout.block_size
    n_rows, n_cols = layout.block_grid
    padded = matrix.new_zeros(n_rows * bs, n_cols * bs)
    padded[: matrix.shape[0], : matrix.shape[1]] = matrix
    blocks = [padded[r * bs:(r + 1) * bs, c * bs:(c + 1) * bs]
              for r, c in zip(layout.coo_row.tolist(), layout.col_idx.tolist())]
    return torch.stack(blocks) if blocks else matrix.new_zeros(0, bs, bs)


def fp16_rule(ours, oracle64, plain_torch):
    """Flash-attention's rule: our error vs the fp64 oracle is at most 2x plain PyTorch's in the same dtype."""
    ours_error = (ours.double() - oracle64).abs().max().item() if ours.numel() else 0.0
    torch_error = (plain_torch.double() - oracle64).abs().max().item() if ours.numel() else 0.0
    assert ours_error <= 2 * torch_error + 1e-5, (ours_error, torch_error)


# ----------------------------------------------------------------------------------------------
# Forward values

@pytest.mark.parametrize("dtype, atol, rtol", EXACT_DTYPES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gemms_match_dense_masked(shape, block_size, density, dtype, atol, rtol):
    layout, values, x, dy, bias = problem(shape, block_size, density, dtype)
    w64 = dense_matrix(values.double(), layout)
    x64, dy64, b64 = x.double(), dy.double(), bias.double()

    y = sk.ops.bsr_linear(x, layout, values, bias)
    assert y.dtype == dtype and y.shape == (shape[0], shape[1])
    torch.testing.assert_close(y, (x64 @ w64.t() + b64).to(dtype), atol=atol, rtol=rtol)
    y_no_bias = sk.ops.bsr_linear(x, layout, values)
    torch.testing.assert_close(y_no_bias, (x64 @ w64.t()).to(dtype), atol=atol, rtol=rtol)

    dx = sk.ops.bsr_linear_dx(dy, layout, values)
    assert dx.dtype == dtype and dx.shape == (shape[0], shape[2])
    torch.testing.assert_close(dx, (dy64 @ w64).to(dtype), atol=atol, rtol=rtol)

    dw = sk.ops.bsr_sddmm(dy, x, layout)
    assert dw.dtype == dtype and dw.shape == (layout.nnz_blocks, block_size, block_size)
    torch.testing.assert_close(dw, padded_blocks(dy64.t() @ x64, layout).to(dtype), atol=atol, rtol=rtol)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gemms_fp16(shape, block_size, density):
    layout, values, x, dy, bias = problem(shape, block_size, density, torch.float16)
    w16 = dense_matrix(values, layout)
    w64 = w16.double()
    x64, dy64, b64 = x.double(), dy.double(), bias.double()

    y = sk.ops.bsr_linear(x, layout, values, bias)
    assert y.dtype == torch.float16
    fp16_rule(y, x64 @ w64.t() + b64, F.linear(x, w16, bias))

    dx = sk.ops.bsr_linear_dx(dy, layout, values)
    assert dx.dtype == torch.float16
    fp16_rule(dx, dy64 @ w64, dy @ w16)

    dw = sk.ops.bsr_sddmm(dy, x, layout)
    assert dw.dtype == torch.float16
    fp16_rule(dw, padded_blocks(dy64.t() @ x64, layout), padded_blocks(dy.t() @ x, layout))


def test_fp16_bias_added_before_rounding():
    """Y = XWᵀ + b rounds once to fp16, like F.linear: 2048 + 1 (product) + 1 (bias) = 2050 exactly.

    Rounding the product first loses it: fp16(2049) = 2048 (ties to even), then fp16(2048 + 1) = 2048.
    """
    layout = sk.BlockSparseLayout.from_block_mask(torch.ones(1, 1, dtype=torch.bool), 16)
    values = torch.zeros(1, 16, 16, dtype=torch.float16)
    values[0, 0, 0], values[0, 0, 1] = 2048, 1
    x = torch.zeros(1, 16, dtype=torch.float16)
    x[0, :2] = 1
    bias = torch.zeros(16, dtype=torch.float16)
    bias[0] = 1
    assert F.linear(x, values[0], bias)[0, 0].item() == 2050  # plain PyTorch, for the record
    assert sk.ops.bsr_linear(x, layout, values, bias)[0, 0].item() == 2050


def test_padding_values_are_ignored():
    """Garbage in the padding region of the values must not reach the output."""
    layout, values, x, dy, bias = problem((5, 37, 70), 16, 1.0)
    noisy = values + 1000.0 * (1 - layout.padding_mask())
    torch.testing.assert_close(sk.ops.bsr_linear(x, layout, noisy, bias), sk.ops.bsr_linear(x, layout, values, bias))
    torch.testing.assert_close(sk.ops.bsr_linear_dx(dy, layout, noisy), sk.ops.bsr_linear_dx(dy, layout, values))
    # ... and the SDDMM writes zeros there
    dw = sk.ops.bsr_sddmm(dy, x, layout)
    assert torch.all(dw[layout.padding_mask() == 0] == 0)
    assert torch.all(dw[layout.padding_mask() == 1] != 0)


# ----------------------------------------------------------------------------------------------
# Gradients

@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bsr_linear_grads_match_dense_autograd(shape, block_size, density, with_bias):
    layout, values, x, dy, bias = problem(shape, block_size, density, torch.float64, requires_grad=True)
    bias = bias if with_bias else None
    y = sk.ops.bsr_linear(x, layout, values, bias)
    inputs = [x, values] + ([bias] if with_bias else [])
    ours = torch.autograd.grad(y, inputs, dy.detach(), materialize_grads=True)

    dense = F.linear(x, dense_matrix(values, layout), bias)
    # density 0: the dense oracle never touches the (empty) values, so their grad is materialised as zeros
    expected = torch.autograd.grad(dense, inputs, dy.detach(), materialize_grads=True)
    for name, got, want in zip(["x", "values", "bias"], ours, expected):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-11, msg=f"grad of {name}")
    # the padding region of the values grad is zero (dense_to_blocks of the padded dense grad)
    assert torch.all(ours[1][layout.padding_mask() == 0] == 0)


# gradcheck perturbs every input element, so these stay small: a few blocks, ragged edges included
@pytest.mark.parametrize("shape, block_size, density", [((3, 20, 37), 16, 0.5), ((2, 16, 16), 16, 1.0),
                                                        ((2, 33, 17), 32, 1.0)])
def test_gradcheck(shape, block_size, density):
    layout, values, x, dy, bias = problem(shape, block_size, density, torch.float64, requires_grad=True)
    assert layout.nnz_blocks > 0
    assert torch.autograd.gradcheck(lambda x, v, b: sk.ops.bsr_linear(x, layout, v, b), (x, values, bias))
    assert torch.autograd.gradcheck(lambda d, v: sk.ops.bsr_linear_dx(d, layout, v), (dy, values))
    assert torch.autograd.gradcheck(lambda d, x: sk.ops.bsr_sddmm(d, x, layout), (dy, x))


@pytest.mark.parametrize("shape, block_size, density", [((2, 16, 16), 16, 1.0), ((2, 20, 18), 16, 0.5)])
def test_gradgradcheck_bsr_linear(shape, block_size, density):
    layout, values, x, dy, bias = problem(shape, block_size, density, torch.float64, requires_grad=True)
    assert layout.nnz_blocks > 0
    assert torch.autograd.gradgradcheck(lambda x, v, b: sk.ops.bsr_linear(x, layout, v, b), (x, values, bias))


# ----------------------------------------------------------------------------------------------
# torch.library.opcheck: schema, fake kernel, autograd registration, AOT dispatch

@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("shape, block_size, density", [((5, 37, 70), 16, 0.4), ((3, 32, 32), 32, 1.0),
                                                        ((2, 20, 40), 16, 0.0)])
def test_opcheck_gemms(shape, block_size, density, requires_grad):
    layout, values, x, dy, bias = problem(shape, block_size, density, torch.float32, requires_grad)
    index = layout.index_tensors()
    n, k = layout.shape
    torch.library.opcheck(torch.ops.sparsekern.bsr_linear.default, (x, values, *index, n, bias))
    torch.library.opcheck(torch.ops.sparsekern.bsr_linear.default, (x, values, *index, n, None))
    torch.library.opcheck(torch.ops.sparsekern.bsr_linear_dx.default, (dy, values, *index, k))
    torch.library.opcheck(torch.ops.sparsekern.bsr_sddmm.default, (dy, x, *index, block_size))
    if not requires_grad:  # block_grad_scores has no derivative (it feeds a mask decision)
        torch.library.opcheck(torch.ops.sparsekern.block_grad_scores.default, (dy, x, block_size))


@pytest.mark.parametrize("grid, density", [((3, 5), 0.5), ((1, 1), 1.0), ((4, 2), 0.0)])
def test_opcheck_build_layout_index(grid, density):
    layout = random_layout((grid[0] * 16, grid[1] * 16), 16, density, seed=grid[0])
    mask = layout.to_block_mask()
    fresh = [torch.zeros_like(t) for t in layout.index_tensors()]
    torch.library.opcheck(torch.ops.sparsekern.build_layout_index_.default, (mask, *fresh))


# ----------------------------------------------------------------------------------------------
# block_grad_scores

@pytest.mark.parametrize("dtype, out_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                              (torch.float64, torch.float64)])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("shape", SHAPES)
def test_block_grad_scores(shape, block_size, dtype, out_dtype):
    m, n, k = shape
    dy = randn(m, n, seed=seed_of(shape, 1), dtype=dtype)
    x = randn(m, k, seed=seed_of(shape, 2), dtype=dtype)
    scores = sk.ops.block_grad_scores(dy, x, block_size)
    assert scores.dtype == out_dtype
    assert scores.shape == (math.ceil(n / block_size), math.ceil(k / block_size))
    expected = block_frobenius_norms(dy.double().t() @ x.double(), block_size)
    tol = 1e-12 if dtype == torch.float64 else 1e-5  # fp16 inputs are exact in fp32: fp32 accumulation error only
    torch.testing.assert_close(scores.double(), expected, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------------------
# bsr_conv2d_grad_scores: block norms of a convolution's dense filter gradient, against F.conv2d's autograd

CONV_SCORE_CASES = [  # batch, (H, W), in, out, kernel, stride, padding, dilation, block
    (2, (9, 11), 20, 37, (3, 3), (2, 2), (1, 1), (1, 1), 16),
    (1, (15, 13), 3, 40, (7, 7), (2, 2), (3, 3), (1, 1), 32),
    (3, (8, 7), 32, 16, (3, 4), (1, 2), (2, 0), (2, 1), 16),
]


@pytest.mark.parametrize("dtype, out_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64)])
@pytest.mark.parametrize("case", CONV_SCORE_CASES, ids=str)
def test_bsr_conv2d_grad_scores(case, dtype, out_dtype):
    batch, size, cin, cout, kernel, stride, padding, dilation, bs = case
    x = randn(batch, cin, *size, seed=seed_of(case, 1), dtype=torch.float64)
    weight = torch.zeros(cout, cin, *kernel, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x, weight, None, stride, padding, dilation)
    dy = randn(*y.shape, seed=seed_of(case, 2), dtype=torch.float64)
    (dweight,) = torch.autograd.grad(y, weight, dy)
    expected = block_frobenius_norms(dweight.permute(0, 2, 3, 1).reshape(cout, -1), bs)
    dy_nhwc, x_nhwc = dy.permute(0, 2, 3, 1).to(dtype), x.permute(0, 2, 3, 1).to(dtype)
    scores = sk.ops.bsr_conv2d_grad_scores(dy_nhwc, x_nhwc, bs, kernel, stride, padding, dilation)
    assert scores.dtype == out_dtype and scores.shape == expected.shape
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(scores.double(), expected, atol=tol, rtol=tol)
    if case is CONV_SCORE_CASES[0]:
        torch.library.opcheck(torch.ops.sparsekern.bsr_conv2d_grad_scores.default,
                              (dy_nhwc.contiguous(), x_nhwc.contiguous(), bs, list(kernel), list(stride),
                               list(padding), list(dilation)))


def test_bsr_conv2d_grad_scores_errors():
    dy, x = randn(2, 3, 3, 8, seed=0), randn(2, 5, 5, 4, seed=1)
    geometry = ((3, 3), (2, 2), (1, 1), (1, 1))
    with pytest.raises(ValueError, match=r"^dy must be a 4-D NHWC"):
        sk.ops.bsr_conv2d_grad_scores(dy[0], x, 16, *geometry)
    with pytest.raises(ValueError, match=r"^x must be a 4-D NHWC"):
        sk.ops.bsr_conv2d_grad_scores(dy, x[0], 16, *geometry)
    with pytest.raises(ValueError, match=r"^dy has batch 2 but x has 1"):
        sk.ops.bsr_conv2d_grad_scores(dy, x[:1], 16, *geometry)
    with pytest.raises(ValueError, match=r"^dy \(torch.float32 on cpu\) must match x \(torch.float64"):
        sk.ops.bsr_conv2d_grad_scores(dy, x.double(), 16, *geometry)
    with pytest.raises(ValueError, match="block_size"):
        sk.ops.bsr_conv2d_grad_scores(dy, x, 24, *geometry)


# ----------------------------------------------------------------------------------------------
# Argument checks: ValueErrors that name the tensor

@pytest.fixture
def linear_problem():
    return problem((5, 37, 70), 16, 0.4)


def test_wrong_in_features(linear_problem):
    layout, values, x, dy, bias = linear_problem
    with pytest.raises(ValueError, match=r"^x has 71 features, expected 70"):
        sk.ops.bsr_linear(randn(5, 71, seed=0), layout, values, bias)
    with pytest.raises(ValueError, match=r"^dy has 36 features, expected 37"):
        sk.ops.bsr_linear_dx(randn(5, 36, seed=0), layout, values)
    with pytest.raises(ValueError, match=r"^x has 71 features"):
        sk.ops.bsr_sddmm(dy, randn(5, 71, seed=0), layout)


def test_dtype_mismatch(linear_problem):
    layout, values, x, dy, bias = linear_problem
    with pytest.raises(ValueError, match=r"^x has dtype torch.float64"):
        sk.ops.bsr_linear(x.double(), layout, values, bias)
    with pytest.raises(ValueError, match=r"^dy has dtype torch.float64"):
        sk.ops.bsr_linear_dx(dy.double(), layout, values)
    with pytest.raises(ValueError, match=r"^bias must match values"):
        sk.ops.bsr_linear(x, layout, values, bias.double())
    with pytest.raises(ValueError, match=r"^(dy|x) has dtype torch.float(32|16)"):
        sk.ops.bsr_sddmm(dy, x.half(), layout)


def test_values_of_wrong_shape(linear_problem):
    layout, values, x, dy, bias = linear_problem
    for bad in (values[1:], values[:, :8], values.reshape(-1, 8, 32), values.flatten()):
        with pytest.raises(ValueError, match=r"^values must have shape"):
            sk.ops.bsr_linear(x, layout, bad, bias)
        with pytest.raises(ValueError, match=r"^values must have shape"):
            sk.ops.bsr_linear_dx(dy, layout, bad)


def test_bias_of_wrong_shape(linear_problem):
    layout, values, x, dy, bias = linear_problem
    for bad in (bias[1:], bias[None], randn(70, seed=0)):
        with pytest.raises(ValueError, match=r"^bias must have shape \(37,\)"):
            sk.ops.bsr_linear(x, layout, values, bad)


def test_input_must_be_2d(linear_problem):
    layout, values, x, dy, bias = linear_problem
    with pytest.raises(ValueError, match=r"^x must be 2-D"):
        sk.ops.bsr_linear(x[None], layout, values, bias)
    with pytest.raises(ValueError, match=r"^x must be 2-D"):
        sk.ops.bsr_linear(x[0], layout, values, bias)
    with pytest.raises(ValueError, match=r"^dy must be 2-D"):
        sk.ops.bsr_linear_dx(dy[None], layout, values)
    with pytest.raises(ValueError, match=r"^dy must be 2-D"):
        sk.ops.block_grad_scores(dy[None], x, 16)


def test_row_count_mismatch(linear_problem):
    layout, values, x, dy, bias = linear_problem
    with pytest.raises(ValueError, match=r"^dy has 5 rows but x has 4"):
        sk.ops.bsr_sddmm(dy, x[:4], layout)
    with pytest.raises(ValueError, match=r"^dy has 5 rows but x has 4"):
        sk.ops.block_grad_scores(dy, x[:4], 16)


@pytest.mark.parametrize("block_size", [24, 8, 0])
def test_block_grad_scores_bad_block_size(block_size):
    with pytest.raises(ValueError, match="block_size"):
        sk.ops.block_grad_scores(randn(4, 32, seed=0), randn(4, 32, seed=1), block_size)


# ----------------------------------------------------------------------------------------------
# Backend selection

def test_bogus_backend_raises(linear_problem, backend_env):
    layout, values, x, dy, bias = linear_problem
    backend_env("bogus")
    with pytest.raises(ValueError, match="SPARSEKERN_BACKEND"):
        sk.ops.bsr_linear(x, layout, values, bias)
    with pytest.raises(ValueError, match="SPARSEKERN_BACKEND"):
        sk.ops.select_backend("bsr_linear", torch.device("cpu"))


@pytest.mark.parametrize("forced", ["cuda", "triton"])
def test_a_forced_gpu_backend_leaves_cpu_tensors_to_the_default(linear_problem, backend_env, monkeypatch, forced):
    """SPARSEKERN_BACKEND=cuda or triton applies to CUDA tensors only (triton also to CPU tensors under
    TRITON_INTERPRET=1): CPU tensors keep auto's choice, so models built on the CPU still build (on the H200 every
    layer constructed on the CPU raised in build_layout_index_)."""
    layout, values, x, dy, bias = linear_problem
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    backend_env("auto")
    default = sk.ops.select_backend("bsr_linear", x.device, x.dtype)
    default_index = sk.ops.select_backend("build_layout_index_", x.device, torch.bool)
    expected = sk.ops.bsr_linear(x, layout, values, bias)
    backend_env(forced)
    assert sk.ops.requested_backend("cpu") == "auto" and sk.ops.requested_backend("cuda") == forced
    assert sk.ops.select_backend("bsr_linear", x.device, x.dtype) == default
    torch.testing.assert_close(sk.ops.bsr_linear(x, layout, values, bias), expected, rtol=0, atol=0)
    assert sk.ops.select_backend("build_layout_index_", x.device, torch.bool) == default_index


def test_a_forced_cpu_backend_leaves_cuda_tensors_to_the_default(backend_env):
    backend_env("cpu")
    assert sk.ops.requested_backend("cuda") == "auto" and sk.ops.requested_backend("cpu") == "cpu"


def test_forced_triton_applies_to_cpu_tensors_under_the_interpreter(backend_env, monkeypatch):
    backend_env("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert sk.ops.requested_backend("cpu") == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert sk.ops.requested_backend("cpu") == "auto"


@pytest.mark.parametrize("forced", ["cuda", "triton"])
def test_models_build_and_train_on_cpu_under_a_forced_gpu_backend(backend_env, monkeypatch, forced):
    """Built the usual way (on the CPU), with a forced GPU backend: construction, sparsify and a training step
    run on the CPU (the cuda-marked test below then moves the model to the GPU)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    backend_env(forced)
    model = small_model(seed=3)
    dense = nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 8))
    sk.sparsify(dense, sparsity=0.5, block_size=16)
    opt = sk.optim.MaskedSGD(list(model.parameters()) + list(dense.parameters()), lr=0.1, momentum=0.9)
    loss = model(randn(4, 8, 6, 6, seed=1)).sum() + dense(randn(5, 12, seed=2)).sum()
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("forced", ["cuda", "triton"])
def test_a_model_built_on_cpu_trains_on_the_gpu_under_a_forced_backend(backend_env, forced):
    backend_env(forced)
    if sk.ops.backend_unavailable_reason(forced, "cuda") is not None:
        pytest.skip(sk.ops.backend_unavailable_reason(forced, "cuda"))
    model = small_model(seed=3)
    model.cuda()
    opt = sk.optim.MaskedSGD(model.parameters(), lr=0.1, momentum=0.9)
    assert sk.ops.select_backend("bsr_conv2d", torch.device("cuda"), torch.float32) == forced
    before = [p.detach().clone() for p in model.parameters()]
    model(randn(4, 8, 6, 6, seed=1).cuda()).sum().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("op", GEMM_OPS)
def test_select_backend_on_cpu(op, backend_env):
    cpu = torch.device("cpu")
    backend_env("auto")
    # no native GEMM kernels yet: the reference runs them; once a CPU kernel exists, auto must take it
    assert sk.ops.select_backend(op, cpu) == ("cpu" if sk.ops.backend_has_op("cpu", op) else "reference")
    backend_env("reference")
    assert sk.ops.select_backend(op, cpu) == "reference"
    backend_env("cpu")  # a forced backend without the op falls back to the reference for it
    assert sk.ops.select_backend(op, cpu) == ("cpu" if sk.ops.backend_has_op("cpu", op) else "reference")


def test_backends_agree_on_gemms(backend_env):
    layout, values, x, dy, bias = problem((9, 40, 70), 16, 0.5, torch.float64)
    results = {}
    for backend in ("reference", "auto", "cpu"):
        backend_env(backend)
        results[backend] = (sk.ops.bsr_linear(x, layout, values, bias), sk.ops.bsr_linear_dx(dy, layout, values),
                            sk.ops.bsr_sddmm(dy, x, layout), sk.ops.block_grad_scores(dy, x, 16))
    for backend in ("auto", "cpu"):
        for got, want in zip(results[backend], results["reference"]):
            torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-11)


# ----------------------------------------------------------------------------------------------
# The call path: through the custom op where something must see it, straight to the implementation otherwise

def sparsekern_ops_run(fn):
    """The sparsekern:: ops the dispatcher ran during fn()."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events() if event.name.startswith("sparsekern::")}


def public_linear_calls(layout, values, x, dy, bias):
    return {"bsr_linear": lambda: sk.ops.bsr_linear(x, layout, values, bias),
            "bsr_linear_dx": lambda: sk.ops.bsr_linear_dx(dy, layout, values),
            "bsr_sddmm": lambda: sk.ops.bsr_sddmm(dy, x, layout),
            "block_grad_scores": lambda: sk.ops.block_grad_scores(dy, x, layout.block_size)}


def test_calls_that_need_no_grad_skip_the_custom_op(monkeypatch):
    layout, values, x, dy, bias = problem((5, 37, 70), 16, 0.4)
    calls = public_linear_calls(layout, values, x, dy, bias)
    for op, call in calls.items():
        assert f"sparsekern::{op}" not in sparsekern_ops_run(call), op
    direct = {op: call() for op, call in calls.items()}
    monkeypatch.setattr(sk.ops, "_run", lambda op, *args: getattr(torch.ops.sparsekern, op)(*args))
    for op, call in calls.items():
        assert f"sparsekern::{op}" in sparsekern_ops_run(call), op  # the patch does route through the custom op
        assert torch.equal(direct[op], call()), op


def test_eager_calls_that_need_grad_run_the_custom_ops_formulas_without_their_wrappers():
    """In plain eager mode a call that needs grad runs a torch.autograd.Function with the custom op's own setup and
    backward (the custom op's Python wrappers cost more host time than a small layer's whole step); ops without
    autograd (block_grad_scores) still go through their custom op. Gradients equal the custom op's."""
    layout, values, x, dy, bias = problem((5, 37, 70), 16, 0.4, requires_grad=True)
    for op, call in public_linear_calls(layout, values, x, dy, bias).items():
        assert (f"sparsekern::{op}" in sparsekern_ops_run(call)) == (op not in sk.ops._EAGER_AUTOGRAD), op
        out = call()
        if op in sk.ops._EAGER_AUTOGRAD:
            assert type(out.grad_fn).__name__ == f"{op}_functionBackward", op
    inputs = (x, values, bias)
    eager = torch.autograd.grad(sk.ops.bsr_linear(x, layout, values, bias), inputs, dy)
    custom = torch.autograd.grad(torch.ops.sparsekern.bsr_linear(x, values, *layout.index_tensors(), 37, bias),
                                 inputs, dy)
    for a, b in zip(eager, custom):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compiling_sees_the_custom_op():
    layout, values, x, dy, bias = problem((5, 37, 70), 16, 0.4, requires_grad=True)
    call = public_linear_calls(layout, values, x, dy, bias)["bsr_linear"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert "sparsekern::bsr_linear" in sparsekern_ops_run(call)


def test_backward_reaches_no_custom_op_and_stays_differentiable():
    layout, values, x, dy, bias = problem((5, 37, 70), 16, 0.4, requires_grad=True)

    def backward(create_graph):
        y = sk.ops.bsr_linear(x, layout, values, bias)
        grads = []
        ran = sparsekern_ops_run(lambda: grads.extend(torch.autograd.grad(y, (x, values), dy.detach(),
                                                                          create_graph=create_graph)))
        return ran, grads

    ran, grads = backward(create_graph=False)
    assert not ran & {"sparsekern::bsr_linear_dx", "sparsekern::bsr_sddmm"}
    assert all(g.grad_fn is None for g in grads)
    ran, grads = backward(create_graph=True)
    assert not ran & {"sparsekern::bsr_linear_dx", "sparsekern::bsr_sddmm"}
    assert [type(g.grad_fn).__name__ for g in grads] == ["bsr_linear_dx_functionBackward",
                                                         "bsr_sddmm_functionBackward"]


def test_a_dispatch_mode_sees_the_public_op():
    from torch.utils._python_dispatch import TorchDispatchMode

    class SeenOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    layout, values, x, dy, bias = problem((5, 37, 70), 16, 0.4)
    with SeenOps() as mode:
        y = sk.ops.bsr_linear(x, layout, values, bias)
    assert mode.ops == ["sparsekern.bsr_linear.default"]
    torch.testing.assert_close(y, sk.ops.bsr_linear(x, layout, values, bias))


# ----------------------------------------------------------------------------------------------
# Autocast

def test_autocast_bf16():
    layout, values, x, dy, bias = problem((6, 37, 70), 16, 0.5, torch.float32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sk.ops.bsr_linear(x, layout, values, bias)
    assert y.dtype == torch.bfloat16
    assert values.dtype == torch.float32
    # compute in bf16, compared with the same product done by plain PyTorch in bf16
    w = dense_matrix(values.detach(), layout)
    oracle = x.detach().double() @ w.double().t() + bias.detach().double()
    plain = F.linear(x.detach().bfloat16(), w.bfloat16(), bias.detach().bfloat16())
    fp16_rule(y.detach(), oracle, plain)
    assert (y.double() - oracle).abs().max() > 0  # really computed in bf16, not fp32

    y.float().backward(dy.detach())
    assert values.grad.dtype == torch.float32 and x.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
    expected = padded_blocks(dy.detach().double().t() @ x.detach().double(), layout)
    torch.testing.assert_close(values.grad.double(), expected, atol=0.1, rtol=2e-2)
    # the bias grad is a sum of bf16 upstream grads: bf16 rounding (8 bits) on values of size ~sqrt(M)
    torch.testing.assert_close(bias.grad, dy.detach().sum(0), atol=0.05, rtol=1e-2)
