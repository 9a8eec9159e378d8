"""``auto`` on CUDA tensors measures the fast backends per call shape (sparsekern.tuning, called from ops.py).

Without a GPU the mechanism runs with fakes: the tuner with fake candidates and a fake timer on ``cuda`` device
objects (no CUDA tensor is made), and the whole dispatch path on CPU tensors, where a tuner for CPU tensors and
an auto order with two fast backends (Triton in the interpreter and the native CPU kernels) stand in for CUDA.
On a GPU one test runs the real measurement.
"""
import pytest
import torch

import sparsekern as sk
from sparsekern import _native, info, ops, tuning

import gemm_cases

CUDA0 = torch.device("cuda", 0)
KEY = tuning.Key("bsr_linear", "cuda:0", torch.float16, ((64, 128),))
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and _native.BUILD_INFO.get("cuda")),
                               reason="needs a CUDA GPU and the CUDA kernels")


class Candidate:
    """A fake backend call that takes ``cost`` ms, or raises ``error``."""

    def __init__(self, cost, error=None):
        self.cost, self.error, self.calls = cost, error, 0

    def __call__(self):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.cost


def timer_by_cost(call, device):
    call()
    return call.cost


class TimerInOrder:
    """Fake timer for real backend calls: returns ``costs`` in the order the candidates are timed (the static
    order), calling each once as the real timer does."""

    def __init__(self):
        self.costs, self.calls = [], 0

    def __call__(self, call, device):
        call()
        self.calls += 1
        return self.costs.pop(0)


@pytest.fixture
def capturing(monkeypatch):
    """Whether the (fake) current CUDA stream is capturing a graph: set ``capturing[0]``."""
    state = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state[0])
    return state


@pytest.fixture
def tuner(monkeypatch, capturing):
    """A fresh CUDA tuner with a fake timer, installed as the one ops.py uses."""
    fresh = tuning.Tuner(timer_by_cost)
    monkeypatch.setattr(tuning, "TUNER", fresh)
    return fresh


# ----------------------------------------------------------------------------------------------
# The tuner with fake candidates

def test_picks_the_fastest_and_records_the_times(tuner):
    triton, cuda = Candidate(2.0), Candidate(0.5)
    assert tuner.choose(KEY, CUDA0, {"triton": triton, "cuda": cuda}, static="triton") == "cuda"
    assert (triton.calls, cuda.calls) == (2, 2)  # one warm-up, one timed call each
    choice = tuner.choices()[KEY]
    assert choice.backend == "cuda"
    assert dict(choice.times_ms) == {"triton": 2.0, "cuda": 0.5}
    assert dict(choice.failures) == {}


def test_a_tie_keeps_the_static_order(tuner):
    assert tuner.choose(KEY, CUDA0, {"triton": Candidate(1.0), "cuda": Candidate(1.0)}, static="triton") == "triton"


def test_the_choice_is_cached_per_key(tuner):
    assert tuner.choose(KEY, CUDA0, {"triton": Candidate(2.0), "cuda": Candidate(1.0)}, static="triton") == "cuda"
    triton, cuda = Candidate(0.1), Candidate(9.0)
    assert tuner.choose(KEY, CUDA0, {"triton": triton, "cuda": cuda}, static="triton") == "cuda"
    assert triton.calls == cuda.calls == 0
    other = KEY._replace(args=((65, 128),))
    assert tuner.choose(other, CUDA0, {"triton": triton, "cuda": cuda}, static="triton") == "triton"
    assert triton.calls == cuda.calls == 2
    assert set(tuner.choices()) == {KEY, other}


def test_a_raising_candidate_is_dropped(tuner):
    failing = Candidate(0.1, RuntimeError("no kernel for this shape"))
    assert tuner.choose(KEY, CUDA0, {"triton": failing, "cuda": Candidate(3.0)}, static="triton") == "cuda"
    assert failing.calls == 1  # the warm-up raised: never timed
    choice = tuner.choices()[KEY]
    assert dict(choice.times_ms) == {"cuda": 3.0}
    assert dict(choice.failures) == {"triton": "RuntimeError: no kernel for this shape"}


def test_a_candidate_raising_in_the_timer_is_dropped(capturing):
    def timer(call, device):
        if call.cost is None:
            raise RuntimeError("timing failed")
        return call.cost

    tuner = tuning.Tuner(timer)
    assert tuner.choose(KEY, CUDA0, {"triton": Candidate(None), "cuda": Candidate(3.0)}, static="triton") == "cuda"
    assert dict(tuner.choices()[KEY].failures) == {"triton": "RuntimeError: timing failed"}


def test_when_every_candidate_raises_the_static_choice_runs_and_nothing_is_cached(tuner):
    calls = {name: Candidate(1.0, ValueError("bad arguments")) for name in ("triton", "cuda")}
    assert tuner.choose(KEY, CUDA0, calls, static="triton") == "triton"
    assert tuner.choices() == {}


def test_no_measuring_under_graph_capture(tuner, capturing):
    capturing[0] = True
    triton, cuda = Candidate(2.0), Candidate(1.0)
    assert tuner.choose(KEY, CUDA0, {"triton": triton, "cuda": cuda}, static="triton") == "triton"
    assert triton.calls == cuda.calls == 0
    assert tuner.choices() == {}
    capturing[0] = False
    assert tuner.choose(KEY, CUDA0, {"triton": triton, "cuda": cuda}, static="triton") == "cuda"
    capturing[0] = True  # a measured key keeps its choice under capture, without calls
    triton.calls = cuda.calls = 0
    assert tuner.choose(KEY, CUDA0, {"triton": triton, "cuda": cuda}, static="triton") == "cuda"
    assert triton.calls == cuda.calls == 0


def test_choices_are_a_read_only_copy(tuner):
    tuner.choose(KEY, CUDA0, {"triton": Candidate(2.0), "cuda": Candidate(1.0)}, static="triton")
    choices = ops.tuned_choices()
    assert set(choices) == {KEY}
    choices.clear()
    assert set(ops.tuned_choices()) == {KEY}
    with pytest.raises(TypeError):
        ops.tuned_choices()[KEY].times_ms["cuda"] = 0.0


def test_rows_bucket_is_the_next_power_of_two():
    assert [tuning.rows_bucket(m) for m in (0, 1, 2, 3, 4, 5, 8, 9, 8192, 8193)] == \
        [1, 1, 2, 4, 4, 8, 8, 16, 8192, 16384]


def test_the_key_holds_op_device_dtype_shapes_and_other_arguments():
    def key(op="bsr_linear", x=torch.zeros(4, 8), block_size=16, geometry=(1, 2)):
        return tuning.call_key(op, (x, torch.zeros(3), block_size, None, list(geometry)))

    base = key()
    hash(base)
    assert base == tuning.Key("bsr_linear", "cpu", torch.float32, ((4, 8), (3,), 16, None, (1, 2)))
    assert key(x=torch.ones(4, 8)) == base  # values do not matter, shapes do
    assert key(x=torch.zeros(3, 8)) == base  # the rows are bucketed like Triton's autotune key (M_BUCKET)
    for other in (key(x=torch.zeros(5, 8)), key(block_size=32), key(geometry=(1, 3)), key(op="bsr_linear_dx"),
                  key(x=torch.zeros(4, 8, dtype=torch.float64)), key(x=torch.zeros(4, 8, device="meta"))):
        assert other != base


def test_the_default_tuner_times_cuda_tensors_with_events():
    assert tuning.TUNER.timer is tuning.cuda_event_timer
    assert tuning.TUNER.measures(CUDA0)
    assert not tuning.TUNER.measures(torch.device("cpu"))


@pytest.mark.parametrize("value, expected", [(None, True), ("1", True), ("0", False), ("", True)])
def test_autotune_env(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("SPARSEKERN_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("SPARSEKERN_AUTOTUNE", value)
    assert tuning.enabled() is expected


def test_autotune_env_rejects_other_values(monkeypatch):
    monkeypatch.setenv("SPARSEKERN_AUTOTUNE", "off")
    with pytest.raises(ValueError, match="SPARSEKERN_AUTOTUNE"):
        tuning.enabled()


@pytest.mark.parametrize("op", ops.OPS)
def test_mutating_ops_are_the_in_place_named_ones(op):
    """ops.py never measures ops named in place; the name must agree with what the schema mutates."""
    schema = getattr(torch.ops.sparsekern, op).default._schema
    writes = any(arg.alias_info is not None and arg.alias_info.is_write for arg in schema.arguments)
    assert ops._mutates(op) == writes


# ----------------------------------------------------------------------------------------------
# The dispatch path, on CPU tensors standing in for CUDA ones

@pytest.fixture
def cpu_race(monkeypatch):
    """auto on CPU tensors chooses between triton (interpreter) and cpu by measuring, with a fake timer."""
    why = ops.backend_unavailable_reason("triton", "cpu") or ops.backend_unavailable_reason("cpu", "cpu")
    if why:
        pytest.skip(why)
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    monkeypatch.delenv("SPARSEKERN_AUTOTUNE", raising=False)
    monkeypatch.setitem(ops._AUTO_ORDER, "cpu", ("triton", "cpu", "reference"))
    timer = TimerInOrder()
    monkeypatch.setattr(tuning, "TUNER", tuning.Tuner(timer, device_type="cpu"))
    return timer


def triton_spy(monkeypatch, op):
    """Counts the calls of the Triton kernel ``op``."""
    from sparsekern import triton_kernels

    kernel = getattr(triton_kernels, op)

    def spy(*args):
        spy.calls += 1
        return kernel(*args)

    spy.calls = 0
    monkeypatch.setattr(triton_kernels, op, spy)
    return spy


def linear_case(m):
    layout = gemm_cases.make_layout((37, 70), 16, 0.5, seed=1)
    values = gemm_cases.random_values(layout, seed=2, dtype=torch.float32)
    return layout, values, gemm_cases.randn(m, 70, seed=3)


def reference_linear(layout, values, x):
    return sk.reference.bsr_linear(x, values, *layout.index_tensors(), layout.shape[0], None)


def test_auto_measures_each_key_once_and_runs_the_choice(cpu_race, monkeypatch):
    triton = triton_spy(monkeypatch, "bsr_linear")
    layout, values, x = linear_case(5)
    cpu_race.costs = [2.0, 1.0]  # triton, cpu
    y = sk.ops.bsr_linear(x, layout, values)
    assert cpu_race.calls == 2
    assert triton.calls == 2  # warm-up and timed call; the op itself ran on cpu
    (key, choice), = ops.tuned_choices().items()
    assert (key.op, key.device, key.dtype) == ("bsr_linear", "cpu", torch.float32)
    assert key.args[0] == (8, 70) and key.args[-2:] == (37, None)  # 5 rows: the bucket of 8
    assert choice.backend == "cpu" and dict(choice.times_ms) == {"triton": 2.0, "cpu": 1.0}
    torch.testing.assert_close(y, reference_linear(layout, values, x))

    torch.testing.assert_close(sk.ops.bsr_linear(x, layout, values), y)  # same key: cached, on cpu
    assert cpu_race.calls == 2 and triton.calls == 2

    x7 = gemm_cases.randn(7, 70, seed=5)  # a new batch size in a seen bucket is not measured again
    torch.testing.assert_close(sk.ops.bsr_linear(x7, layout, values), reference_linear(layout, values, x7))
    assert cpu_race.calls == 2 and triton.calls == 2

    x9 = gemm_cases.randn(9, 70, seed=4)  # a batch size in another bucket is another key
    cpu_race.costs = [1.0, 3.0]
    y9 = sk.ops.bsr_linear(x9, layout, values)
    assert cpu_race.calls == 4
    assert triton.calls == 5  # measured twice, then ran the op
    assert sorted(c.backend for c in ops.tuned_choices().values()) == ["cpu", "triton"]
    torch.testing.assert_close(y9, reference_linear(layout, values, x9))


def test_autograd_ops_are_measured_too(cpu_race):
    layout, values, x = linear_case(6)
    cpu_race.costs = [1.0, 2.0] * 3
    sk.ops.bsr_linear(x.requires_grad_(), layout, values.requires_grad_()).sum().backward()
    assert sorted(key.op for key in ops.tuned_choices()) == ["bsr_linear", "bsr_linear_dx", "bsr_sddmm"]


def test_autotune_off_keeps_the_static_order(cpu_race, monkeypatch):
    triton = triton_spy(monkeypatch, "bsr_linear")
    layout, values, x = linear_case(5)
    cpu_race.costs = [2.0, 1.0]
    sk.ops.bsr_linear(x, layout, values)  # measured: cpu wins
    assert triton.calls == 2
    monkeypatch.setenv("SPARSEKERN_AUTOTUNE", "0")
    sk.ops.bsr_linear(x, layout, values)  # the cached choice is ignored too
    assert triton.calls == 3
    sk.ops.bsr_linear(gemm_cases.randn(7, 70, seed=5), layout, values)  # a new key is not measured
    assert triton.calls == 4 and cpu_race.calls == 2 and len(ops.tuned_choices()) == 1


@pytest.mark.parametrize("forced", ["cpu", "triton"])
def test_a_forced_backend_is_not_measured(cpu_race, monkeypatch, forced):
    triton = triton_spy(monkeypatch, "bsr_linear")
    monkeypatch.setenv("SPARSEKERN_BACKEND", forced)
    layout, values, x = linear_case(5)
    y = sk.ops.bsr_linear(x, layout, values)
    assert cpu_race.calls == 0 and ops.tuned_choices() == {}
    assert triton.calls == (1 if forced == "triton" else 0)
    torch.testing.assert_close(y, reference_linear(layout, values, x))


def test_mutating_ops_are_never_measured(cpu_race):
    assert ops.backend_has_op("triton", "masked_sgd_", torch.float32)
    assert ops.backend_has_op("cpu", "masked_sgd_", torch.float32)
    param, grad = gemm_cases.randn(4, 16, 16, seed=6), gemm_cases.randn(4, 16, 16, seed=7)
    expected = param - 0.1 * grad
    step = torch.zeros((), dtype=torch.int64)
    sk.ops.masked_sgd_(param, grad, None, None, step, lr=0.1)
    assert cpu_race.calls == 0 and ops.tuned_choices() == {}
    assert step.item() == 1  # applied once
    torch.testing.assert_close(param, expected)


def test_cpu_tensors_are_not_measured_by_default(monkeypatch):
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    timer = TimerInOrder()
    monkeypatch.setattr(tuning, "TUNER", tuning.Tuner(timer))
    monkeypatch.setitem(ops._AUTO_ORDER, "cpu", ("triton", "cpu", "reference"))  # two fast backends, yet
    layout, values, x = linear_case(5)
    sk.ops.bsr_linear(x, layout, values)
    assert timer.calls == 0 and ops.tuned_choices() == {}


# ----------------------------------------------------------------------------------------------
# python -m sparsekern.info

def test_info_says_auto_measures_on_cuda(monkeypatch):
    monkeypatch.delenv("SPARSEKERN_AUTOTUNE", raising=False)
    text = info.report()
    assert "auto on cuda measures per shape" in text
    assert "SPARSEKERN_AUTOTUNE=1" in text
    monkeypatch.setenv("SPARSEKERN_AUTOTUNE", "0")
    assert "SPARSEKERN_AUTOTUNE=0" in info.report()


def test_info_lists_measured_choices(tuner):
    assert "measured choices" not in info.report()
    failing = Candidate(0.1, RuntimeError("no kernel"))
    tuner.choose(KEY, CUDA0, {"triton": failing, "cuda": Candidate(0.25)}, static="triton")
    text = info.report()
    assert "auto's measured choices in this process" in text
    assert "  bsr_linear cuda:0 float16 ((64, 128),) -> cuda  (cuda 0.250; triton dropped (RuntimeError: no kernel))" \
        in text.splitlines()


# ----------------------------------------------------------------------------------------------
# On a GPU: the real measurement

@needs_gpu
def test_auto_times_triton_and_cuda_on_a_gpu(monkeypatch):
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    monkeypatch.delenv("SPARSEKERN_AUTOTUNE", raising=False)
    monkeypatch.setattr(tuning, "TUNER", tuning.Tuner())
    layout, args = gemm_cases.linear_args((300, 200, 150), 32, 0.5, torch.float16, seed=8, device="cuda")
    out = torch.ops.sparsekern.bsr_linear(*args)
    (key, choice), = ops.tuned_choices().items()
    assert key == tuning.call_key("bsr_linear", args)
    assert set(choice.times_ms) | set(choice.failures) == {"triton", "cuda"}, choice
    assert choice.backend in choice.times_ms and all(ms > 0 for ms in choice.times_ms.values())
    gemm_cases.assert_close_to_reference("bsr_linear", args, out)
    torch.ops.sparsekern.bsr_linear(*args)
    assert ops.tuned_choices() == {key: choice}
