"""The fused masked_sgd_ of every backend (native CPU, native CUDA, Triton) against sparsekern.reference.

Each backend is called directly with the reference's arguments on random tensors of awkward sizes, for the
hyper-parameter combinations of torch.optim.SGD plus the AMP / SparseOpt extras (per-block grad_scale,
inv_loss_scale, found_inf), on the first step (the momentum buffer starts as the gradient) and later ones.
Then through the optimizers: MaskedSGD / SparseOpt on a backend match the reference backend over 5 steps.

Tolerances: the native CPU kernel does the reference's arithmetic in its order with the same fused
multiply-adds that torch's CPU kernels use, so it is compared bit for bit (where torch's CPU kernels use FMA,
i.e. on AVX2/AVX-512). The GPU backends and the Triton interpreter (which rounds tl.fma twice) may differ by
an ulp of the operands, so they get rtol 1e-6 plus a few fp32 ulps of the operands' magnitude.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from conftest import randn, small_model
from sparsekern import _native, ops, reference
from sparsekern.optim import MaskedSGD, SparseOpt

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cpu" if INTERPRET else "cuda"
OP = "native_masked_sgd_"
# torch's CPU add(alpha=...) is a fused multiply-add exactly when its vectorised kernels have FMA.
CPU_EXACT = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _triton_available():
    if not (INTERPRET or HAS_CUDA):
        return False
    try:
        import sparsekern.triton_kernels  # noqa: F401
    except ImportError:
        return False
    return True


needs_cpu_kernel = pytest.mark.skipif(not _native.has_kernel(OP, "cpu"),
                                      reason=f"no native CPU kernel ({_native.LOAD_ERROR or 'not registered'})")
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
needs_cuda_kernel = pytest.mark.skipif(not (HAS_CUDA and _native.has_kernel(OP, "cuda")),
                                       reason="needs a CUDA GPU and the native CUDA kernel")
needs_triton = pytest.mark.skipif(not _triton_available(), reason="needs TRITON_INTERPRET=1 or a CUDA GPU, and triton")
triton_mark = pytest.mark.interpreter if TRITON_DEVICE == "cpu" else pytest.mark.cuda

# (backend, device): every backend that can run here is compared against the reference on its device.
BACKENDS = [
    pytest.param("cpu", "cpu", marks=needs_cpu_kernel, id="cpu"),
    pytest.param("triton", TRITON_DEVICE, marks=[needs_triton, triton_mark], id="triton"),
    pytest.param("cuda", "cuda", marks=[needs_cuda_kernel, pytest.mark.cuda], id="cuda"),
]

SHAPES = [(7, 16, 16), (13, 33), (5,)]
HYPER = {
    "plain": dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, decoupled_weight_decay=False),
    "momentum": dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, decoupled_weight_decay=False),
    "nesterov_wd": dict(momentum=0.9, dampening=0.0, weight_decay=5e-3, nesterov=True, decoupled_weight_decay=False),
    "dampening_wd": dict(momentum=0.8, dampening=0.3, weight_decay=1e-2, nesterov=False, decoupled_weight_decay=False),
    "decoupled": dict(momentum=0.9, dampening=0.1, weight_decay=3e-2, nesterov=False, decoupled_weight_decay=True),
    "decay_only": dict(momentum=0.0, dampening=0.0, weight_decay=1e-2, nesterov=False, decoupled_weight_decay=False),
}
# (grad_scale, inv_loss_scale, found_inf): None = absent; found_inf 1.0 skips the step.
EXTRAS = [(False, None, None), (True, 1 / 1024, 0.0), (True, None, 1.0), (False, 1 / 3, None), (True, 0.5, None)]


def kernel(backend):
    if backend == "reference":
        return reference.masked_sgd_
    if backend == "triton":
        from sparsekern import triton_kernels
        return triton_kernels.masked_sgd_
    return torch.ops.sparsekern.native_masked_sgd_


def make_case(shape, seed, device, param_dtype=torch.float32, weights_dtype=torch.float32, momentum=True,
              step=0, grad_scale=False, inv_loss_scale=None, found_inf=None):
    """Operands of one call, as a dict of the reference's tensor arguments."""
    weights = randn(*shape, seed=seed, dtype=weights_dtype)
    master = weights if param_dtype != weights_dtype else None
    param = weights.to(param_dtype) if master is not None else weights
    scalar = lambda v, dtype: None if v is None else torch.tensor(v, dtype=dtype, device=device)  # noqa: E731
    case = dict(
        param=param,
        grad=randn(*shape, seed=seed + 1, dtype=param_dtype),
        momentum_buffer=randn(*shape, seed=seed + 2, dtype=weights_dtype) if momentum else None,
        master=master,
        step=torch.tensor(step, dtype=torch.int64),
        grad_scale=(torch.rand(shape[0], generator=torch.Generator().manual_seed(seed + 3)) + 0.5
                    if grad_scale else None),
        inv_loss_scale=scalar(inv_loss_scale, torch.float32),
        found_inf=scalar(found_inf, torch.float32),
    )
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in case.items()}


def run(backend, case, hyper, lr=0.05):
    """Apply one step of ``backend`` to a copy of ``case``; returns the copy (the mutated tensors)."""
    out = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in case.items()}
    kernel(backend)(out["param"], out["grad"], out["momentum_buffer"], out["master"], out["step"], out["grad_scale"],
                    out["inv_loss_scale"], out["found_inf"], lr, hyper["momentum"], hyper["dampening"],
                    hyper["weight_decay"], hyper["nesterov"], hyper["decoupled_weight_decay"])
    return out


def magnitude(case):
    return 1.0 + max(float(v.abs().max()) for k, v in case.items()
                     if torch.is_tensor(v) and v.is_floating_point() and v.numel() > 0 and k != "found_inf")


def assert_same_step(out, expected, case, exact):
    assert torch.equal(out["step"], expected["step"]), (out["step"], expected["step"])
    mag = magnitude(case)
    for name in ("master", "momentum_buffer", "param"):
        got, want = out[name], expected[name]
        if want is None:
            assert got is None
            continue
        if exact:
            assert torch.equal(got, want), f"{name}: max diff {(got.double() - want.double()).abs().max()}"
        elif name == "param" and out["master"] is not None:
            # a rounding of the master: itself exactly, the reference's to within one ulp of its dtype
            torch.testing.assert_close(got, out["master"].to(got.dtype), rtol=0, atol=0)
            torch.testing.assert_close(got.float(), want.float(), rtol=torch.finfo(got.dtype).eps, atol=1e-6 * mag)
        else:
            eps = torch.finfo(want.dtype).eps
            torch.testing.assert_close(got, want, rtol=1e-6, atol=4 * eps * mag)


def check_backend(backend, device, shape, hyper_name, step, param_dtype, weights_dtype=torch.float32, seed=0):
    hyper = HYPER[hyper_name]
    for i, (grad_scale, inv, found_inf) in enumerate(EXTRAS):
        case = make_case(shape, seed + 10 * i, device, param_dtype, weights_dtype, momentum=hyper["momentum"] != 0,
                         step=step, grad_scale=grad_scale, inv_loss_scale=inv, found_inf=found_inf)
        expected = run("reference", case, hyper)
        out = run(backend, case, hyper)
        assert_same_step(out, expected, case, exact=backend == "cpu" and CPU_EXACT)
        if found_inf:  # skipped: nothing moves, the counter included
            assert int(out["step"]) == step
            for name in ("master", "momentum_buffer"):
                if case[name] is not None:
                    assert torch.equal(out[name], case[name])
            if case["master"] is None:
                assert torch.equal(out["param"], case["param"])


# ----------------------------------------------------------------------------------------------
# Each backend, called directly, against the reference

@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("step", [0, 3])
@pytest.mark.parametrize("hyper_name", list(HYPER))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_matches_reference(backend, device, shape, hyper_name, step):
    check_backend(backend, device, shape, hyper_name, step, torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("step", [0, 3])
@pytest.mark.parametrize("hyper_name", ["momentum", "nesterov_wd", "decoupled"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bf16_param_with_fp32_master(backend, device, shape, hyper_name, step):
    if device == "cpu" and backend == "triton":
        pytest.skip("bf16 is wrong in the Triton interpreter")
    check_backend(backend, device, shape, hyper_name, step, torch.bfloat16)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("hyper_name", ["momentum", "decoupled"])
def test_fp16_param_with_fp32_master(backend, device, hyper_name):
    if device == "cpu" and backend == "triton":
        pytest.skip("16-bit types are not exercised in the Triton interpreter")
    check_backend(backend, device, (13, 33), hyper_name, 3, torch.float16)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.id != "triton"])
@pytest.mark.parametrize("hyper_name", ["momentum", "nesterov_wd", "decoupled"])
def test_fp64_matches_reference(backend, device, hyper_name):
    check_backend(backend, device, (7, 16, 16), hyper_name, 2, torch.float64, weights_dtype=torch.float64)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fp32_master_of_fp32_param_and_fp32_grad_of_bf16_param(backend, device):
    """Less common pairings the kernels accept: an fp32 master for an fp32 param, an fp32 grad for bf16."""
    hyper = HYPER["nesterov_wd"]
    case = make_case((13, 33), 5, device, momentum=True, step=1, grad_scale=True, inv_loss_scale=0.25)
    case["master"] = case["param"].clone()
    exact = backend == "cpu" and CPU_EXACT
    assert_same_step(run(backend, case, hyper), run("reference", case, hyper), case, exact)
    if not (backend == "triton" and device == "cpu"):
        case = make_case((13, 33), 6, device, param_dtype=torch.bfloat16, momentum=True, step=1)
        case["grad"] = case["grad"].float()
        assert_same_step(run(backend, case, hyper), run("reference", case, hyper), case, exact)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_param_still_counts_the_step(backend, device):
    case = make_case((0, 16, 16), 0, device, momentum=True, step=4)
    out = run(backend, case, HYPER["momentum"])
    assert int(out["step"]) == 5


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_large_and_unaligned(backend, device):
    """Enough elements for several parallel tasks / programs, and operands that start off 16-byte alignment."""
    hyper = HYPER["nesterov_wd"]
    n = 40_000 if device == "cpu" and backend == "triton" else 300_001
    case = make_case((n,), 7, device, momentum=True, step=2, inv_loss_scale=0.5)
    exact = backend == "cpu" and CPU_EXACT
    assert_same_step(run(backend, case, hyper), run("reference", case, hyper), case, exact)
    shifted = {k: (v[1:] if torch.is_tensor(v) and v.dim() == 1 and v.numel() == n else v) for k, v in case.items()}
    assert_same_step(run(backend, shifted, hyper), run("reference", shifted, hyper), shifted, exact)


@needs_cpu_kernel
def test_cpu_every_instruction_set(monkeypatch):
    available = ["scalar"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        available.append("avx2")
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        available.append("avx512")
    for isa in available:
        monkeypatch.setenv("SPARSEKERN_CPU_ISA", isa)
        for param_dtype in (torch.float32, torch.bfloat16):
            check_backend("cpu", "cpu", (7, 16, 16), "nesterov_wd", 3, param_dtype)
            check_backend("cpu", "cpu", (13, 33), "decoupled", 0, param_dtype)


@needs_cpu_kernel
def test_cpu_bit_identical_across_thread_counts():
    case = make_case((300, 32, 32), 11, "cpu", param_dtype=torch.bfloat16, momentum=True, step=5, grad_scale=True,
                     inv_loss_scale=1 / 512)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run("cpu", case, HYPER["nesterov_wd"]))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for name in ("param", "master", "momentum_buffer", "step"):
            assert torch.equal(other[name], results[0][name])


@needs_cpu_kernel
def test_cpu_strided_operands():
    """Non-contiguous operands take the (slow) contiguous-copy path and still update in place."""
    hyper = HYPER["momentum"]
    case = make_case((16, 9), 3, "cpu", momentum=True, step=1, grad_scale=True)
    strided = {k: (v.t().contiguous().t() if torch.is_tensor(v) and v.dim() == 2 else v) for k, v in case.items()}
    assert not strided["param"].is_contiguous()
    out = run("cpu", strided, hyper)
    expected = run("reference", case, hyper)
    for name in ("param", "momentum_buffer"):
        torch.testing.assert_close(out[name], expected[name], rtol=0, atol=0)


@needs_cpu_kernel
def test_native_errors_name_the_argument():
    fn = torch.ops.sparsekern.native_masked_sgd_
    p = torch.zeros(4, 4, dtype=torch.bfloat16)
    step = torch.zeros((), dtype=torch.int64)
    with pytest.raises(RuntimeError, match="fp32 master"):
        fn(p, p.clone(), None, None, step, None, None, None, 0.1, 0.0, 0.0, 0.0, False, False)
    w = torch.zeros(4, 4)
    with pytest.raises(RuntimeError, match="momentum_buffer is required"):
        fn(w, w.clone(), None, None, step, None, None, None, 0.1, 0.9, 0.0, 0.0, False, False)
    with pytest.raises(RuntimeError, match="grad_scale"):
        fn(w, w.clone(), None, None, step, torch.ones(3), None, None, 0.1, 0.0, 0.0, 0.0, False, False)
    with pytest.raises(RuntimeError, match="step must be int64"):
        fn(w, w.clone(), None, None, step.int(), None, None, None, 0.1, 0.0, 0.0, 0.0, False, False)


@needs_cpu_kernel
def test_dispatch_picks_native_cpu(backend_env):
    backend_env("auto")
    assert ops.select_backend("masked_sgd_", torch.device("cpu"), torch.float32) == "cpu"
    assert ops.select_backend("masked_sgd_", torch.device("cpu"), torch.float64) == "cpu"
    assert "cpu" in _native.BUILD_INFO["native_ops"][OP]


def test_cuda_kernel_is_built_when_cuda_is():
    if not (_native.LOADED and _native.BUILD_INFO.get("cuda")):
        pytest.skip("sparsekern._C was built without CUDA")
    assert _native.has_kernel(OP, "cuda")
    assert "cuda" in _native.BUILD_INFO["native_ops"][OP]


@needs_triton
def test_triton_has_the_op_for_its_dtypes():
    from sparsekern import triton_kernels
    assert ops.backend_has_op("triton", "masked_sgd_", torch.float32)
    assert ops.backend_has_op("triton", "masked_sgd_", torch.bfloat16)
    assert not ops.backend_has_op("triton", "masked_sgd_", torch.float64)
    assert triton_kernels.masked_sgd_ is not None


@needs_triton
@triton_mark
def test_triton_launch_rounds_each_product(monkeypatch):
    """The step is launched without Triton's contraction of a * b + c into one FMA, which rounds the product
    differently from the reference (the interpreter never contracts; tests/test_triton_static.py checks the PTX)."""
    from sparsekern.triton_kernels import masked_sgd as module
    launches = []
    launch = module._masked_sgd_kernel.run
    monkeypatch.setattr(module._masked_sgd_kernel, "run",
                        lambda *args, **kwargs: launches.append(kwargs) or launch(*args, **kwargs))
    run("triton", make_case((5,), 0, TRITON_DEVICE, grad_scale=True), HYPER["momentum"])
    assert len(launches) == 1 and launches[0]["enable_fp_fusion"] is False


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("backend", [pytest.param("cuda", marks=needs_cuda_kernel),
                                     pytest.param("triton", marks=needs_triton)])
def test_cuda_runs_without_host_sync(backend):
    """The whole step, counter included, is enqueued: the CUDA graph of a step captures and replays, and its
    replays take the first step (buffer = gradient) and then a momentum step, as the counter on the device says."""
    hyper = HYPER["nesterov_wd"]
    case = make_case((64, 32, 32), 2, "cuda", param_dtype=torch.bfloat16, momentum=True, step=0, grad_scale=True,
                     inv_loss_scale=0.5, found_inf=0.0)
    ours = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in case.items()}
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        run(backend, ours, hyper)  # warm-up (compiles, loads) outside the graph; run() steps a copy of ours
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    args = [ours[k] for k in ("param", "grad", "momentum_buffer", "master", "step", "grad_scale", "inv_loss_scale",
                              "found_inf")]
    with torch.cuda.graph(graph):
        kernel(backend)(*args, 0.05, hyper["momentum"], hyper["dampening"], hyper["weight_decay"], hyper["nesterov"],
                        hyper["decoupled_weight_decay"])
    expected = case
    for _ in range(2):
        expected = run("reference", expected, hyper)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    assert int(ours["step"]) == 2
    for name in ("master", "momentum_buffer"):
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------
# Through the optimizers: a backend against SPARSEKERN_BACKEND=reference over 5 steps

OPTIMIZER_HYPER = [
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-3),
    dict(lr=0.05, momentum=0.8, dampening=0.2, weight_decay=1e-2, decoupled_weight_decay=True),
]
OPTIMIZER_BACKENDS = [
    pytest.param("cpu", marks=needs_cpu_kernel, id="cpu"),
    pytest.param("triton", marks=[needs_triton, pytest.mark.interpreter,
                                  pytest.mark.skipif(not INTERPRET, reason="the CPU model runs Triton only "
                                                                           "under the interpreter")], id="triton"),
]


@pytest.mark.parametrize("backend", OPTIMIZER_BACKENDS)
@pytest.mark.parametrize("hyper", OPTIMIZER_HYPER, ids=["nesterov", "decoupled"])
@pytest.mark.parametrize("optimizer_cls", [MaskedSGD, SparseOpt])
def test_optimizer_matches_reference_backend(optimizer_cls, hyper, backend, monkeypatch):
    ours, theirs = small_model(0), small_model(0)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p, q)
    opt_ours, opt_theirs = optimizer_cls(ours.parameters(), **hyper), optimizer_cls(theirs.parameters(), **hyper)
    for step in range(5):
        x = randn(6, 8, 6, 6, seed=100 + step)
        target = torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(200 + step))
        for model, optimizer, step_backend in ((ours, opt_ours, backend), (theirs, opt_theirs, "reference")):
            # Gradients always come from the reference ops: this compares the optimizer step alone.
            monkeypatch.setenv("SPARSEKERN_BACKEND", "reference")
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), target).backward()
            monkeypatch.setenv("SPARSEKERN_BACKEND", step_backend)
            optimizer.step()
    exact = backend == "cpu" and CPU_EXACT
    for p, q in zip(ours.parameters(), theirs.parameters()):
        buf_p = opt_ours.state[p]["momentum_buffer"]
        buf_q = opt_theirs.state[q]["momentum_buffer"]
        assert int(opt_ours.state[p]["taken_steps"]) == int(opt_theirs.state[q]["taken_steps"]) == 5
        if exact:
            assert torch.equal(p, q) and torch.equal(buf_p, buf_q)
        else:
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(buf_p, buf_q, rtol=1e-5, atol=1e-6)
