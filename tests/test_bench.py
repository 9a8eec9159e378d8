"""The benchmark tools on tiny shapes: the default suite's training loops, tables, CSV and plots, the GPU suites
(gpu-linear, gpu-optim, gpu-conv) run end to end on the CPU, their correctness check catching wrong backends, --help
and --static, and convergence.py: its statistics on made-up numbers and its tiny preset end to end."""
import csv
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import sparsekern as sk
from sparsekern import bench
from sparsekern.bench import common, e2e, gpu_conv, gpu_linear, gpu_optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _convergence():
    """benchmarks/convergence.py (a script, not a package module), loaded once."""
    if "sparsekern_convergence" not in sys.modules:
        spec = importlib.util.spec_from_file_location("sparsekern_convergence",
                                                      os.path.join(ROOT, "benchmarks", "convergence.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules["sparsekern_convergence"]


def tiny_net(num_classes=10, in_channels=3):
    """A stem, two 64-channel convolutions and a classifier: big enough for 16x16 blocks, fast on a CPU."""
    return nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, num_classes))


TINY = bench.E2ECase(tiny_net, image_size=8, batch=4, num_classes=10)
CPU = torch.device("cpu")


def test_help_runs():
    result = subprocess.run([sys.executable, "-m", "sparsekern.bench", "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--quick", "--skip-e2e", "--skip-kernels", "--no-plots", "--e2e-reps", "--suite", "--static",
                 "--shape", "--dtype", "--sparsities", "--blocks", "--backends", "--batch", "--image-size"):
        assert flag in result.stdout


def test_e2e_loops_share_the_mask_and_keep_the_stem_dense():
    loops = bench.build_e2e_loops(TINY, 0.75, 16, CPU, use_rigl_torch=False)
    assert set(loops) == {"dense", "simulated", "ours"}
    ours, simulated = loops["ours"].model, loops["simulated"].model
    assert type(ours[0]) is nn.Conv2d  # the 3-channel stem
    sparse_names = [n for n, m in ours.named_modules() if isinstance(m, (sk.SparseConv2d, sk.SparseLinear))]
    masks = loops["simulated"].masks
    assert sparse_names and set(sparse_names) == set(masks)
    for name, mask in masks.items():
        assert torch.equal(mask.bool(), ours.get_submodule(name).to_dense().weight != 0)
    for loop in loops.values():
        loop.step()
        loop.update_step()
    # the simulated loop keeps its weights inside the mask through the optimizer step
    for name, mask in masks.items():
        assert torch.all(simulated.get_submodule(name).weight[mask == 0] == 0)


def test_update_step_moves_blocks_in_ours():
    loops = bench.build_e2e_loops(TINY, 0.75, 16, CPU, use_rigl_torch=False)
    ours = loops["ours"]
    ours.step()
    assert ours.dst.step_count == 1
    ours.update_step()
    assert ours.dst.step_count == bench.E2E_UPDATE_INTERVAL  # the jump lands on an update step
    assert ours.dst.update_seconds > 0


def test_bench_e2e_rows_table_csv_and_plot(tmp_path):
    lines = []
    rows = bench.bench_e2e([TINY], [0.75], CPU, reps=1, block=16, use_rigl_torch=False, report=lines.append)
    assert [r["method"] for r in rows] == ["dense", "simulated", "ours"]
    dense = rows[0]
    assert dense["vs_dense"] == pytest.approx(1.0)
    for row in rows:
        assert row["images_per_s"] > 0 and row["step_ms"] > 0 and row["update_step_ms"] > 0
        assert row["vs_dense"] == pytest.approx(row["images_per_s"] / dense["images_per_s"])
    assert "images/s" in lines[0] and "simulated" in lines[0]

    path = bench.write_e2e_csv(rows, str(tmp_path), CPU)
    with open(path) as f:
        written = list(csv.DictReader(f))
    assert [r["method"] for r in written] == ["dense", "simulated", "ours"]
    assert set(written[0]) == set(bench.E2E_FIELDS)
    pytest.importorskip("matplotlib")
    png = bench.plot_e2e(rows, str(tmp_path / "e2e.png"))
    assert png and os.path.getsize(png) > 0


def test_amortised_rate_counts_one_update_per_interval():
    class Fixed(bench.TrainLoop):
        def __init__(self):
            self.x = torch.zeros(10, 1)

        def step(self):
            pass

    timings = bench.time_e2e_loops({"a": Fixed()}, CPU, reps=2)
    t = timings["a"]
    amortised = ((bench.E2E_UPDATE_INTERVAL - 1) * t["step_ms"] + t["update_step_ms"]) / bench.E2E_UPDATE_INTERVAL
    assert t["images_per_s"] == pytest.approx(10 * 1e3 / amortised)


def test_kernel_speedup_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [bench._row(op, "s", s, b, 2.0, float("nan"), "cpu", 2.0 * (1 - s) + 0.1)
            for op in ("linear_fwd", "linear_fwd_bwd", "conv_fwd_bwd") for b in (16, 32) for s in (0.5, 0.9)]
    png = bench.plot_kernel_speedup(rows, str(tmp_path / "speedup.png"), "tiny")
    assert png and os.path.getsize(png) > 0
    assert bench.plot_kernel_speedup([], str(tmp_path / "none.png")) is None


def test_main_writes_e2e_outputs_only_when_asked(tmp_path, monkeypatch):
    # The CLI's e2e path on a tiny case, without running the real models.
    monkeypatch.setattr(bench.e2e, "e2e_cases", lambda device, quick: [TINY])
    assert bench.main(["--quick", "--skip-kernels", "--e2e-reps", "1", "--out", str(tmp_path)]) == 0
    name = bench.device_name(CPU)
    assert (tmp_path / f"{name}_e2e.csv").exists()
    assert not (tmp_path / f"{name}.csv").exists()  # the kernel CSV is left alone
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / f"{name}_e2e.png").exists()


# -- the GPU suites, run on the CPU with tiny shapes ---------------------------------------------------------
# The Triton backend is among them when conftest runs Triton in the interpreter; the native CPU one when built.
CPU_BACKENDS = [b for b in ("triton", "cpu") if sk.ops.backend_unavailable_reason(b, "cpu") is None]
NATIVE_OR_REFERENCE = "cpu" if "cpu" in CPU_BACKENDS else "reference"


def _read_csv(path):
    with open(path) as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _suite_csv(tmp_path, suite):
    return tmp_path / f"{bench.device_name(CPU)}_{suite}.csv"


def _linear_args(tmp_path, blocks="32", extra=()):
    # N = 128, K = 96: at block 64 the last block-column is half padding.
    return ["--device", "cpu", "--suite", "gpu-linear", "--shape", "192,128,96", "--dtype", "float32",
            "--sparsities", "0.5", "--blocks", blocks, "--reps", "1", "--no-plots", "--out", str(tmp_path), *extra]


def test_gpu_linear_suite_runs_on_cpu(tmp_path, capsys):
    assert bench.main(_linear_args(tmp_path, blocks="32,64")) == 0
    fields, rows = _read_csv(_suite_csv(tmp_path, "gpu_linear"))
    assert fields == gpu_linear.FIELDS
    for op in ("linear_fwd", "linear_dx", "linear_sddmm", "block_grad_scores"):
        for block in ("32", "64"):
            group = {r["impl"]: r for r in rows if r["op"] == op and r["block"] == block}
            expected = {"dense", "torch", *CPU_BACKENDS} | ({"stk"} if op != "block_grad_scores" else set())
            assert set(group) == expected, (op, block)
            assert float(group["dense"]["speedup"]) == 1.0
            for name in CPU_BACKENDS:
                row = group[name]
                assert row["status"] == "ok", row
                assert float(row["ms"]) > 0 and float(row["rel_err"]) <= float(row["err_limit"])
                assert float(row["speedup"]) == pytest.approx(float(row["dense_ms"]) / float(row["ms"]))
                if op != "block_grad_scores":
                    assert float(row["frac_ideal"]) == pytest.approx(float(row["density"]) * float(row["speedup"]),
                                                                     rel=1e-3)
            if op != "block_grad_scores":
                assert group["stk"]["status"] == "n/a" and group["stk"]["note"]  # block != 128 or not installed
    assert "goals (Hopper-GEMM issue" in capsys.readouterr().out


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="the TMA variant is the triton backend's")
def test_kernel_variants_run_only_when_requested(tmp_path):
    assert bench.main(_linear_args(tmp_path, extra=("--backends", "triton,triton-tma"))) == 0
    _, rows = _read_csv(_suite_csv(tmp_path, "gpu_linear"))
    variant = [r for r in rows if r["impl"] == "triton-tma"]
    assert {r["op"] for r in variant} == {"linear_fwd", "linear_dx", "linear_sddmm", "block_grad_scores"}
    assert all(r["status"] == "ok" and float(r["ms"]) > 0 for r in variant)
    assert "triton-tma" not in dict(common.backend_choices("bsr_linear", CPU, torch.float32))
    # An op the variant does not change would time the backend's usual kernel under the variant's name: n/a instead;
    # a pass with some of its ops runs them.
    why = dict(common.backend_choices("bsr_conv2d_grad_scores", CPU, torch.float32, ["triton-tma"]))["triton-tma"]
    assert why == "no bsr_conv2d_grad_scores kernel in triton-tma"
    mixed = ("bsr_conv2d", "bsr_conv2d_grad_scores")
    assert dict(common.backend_choices(mixed, CPU, torch.float32, ["triton-tma"]))["triton-tma"] is None


def test_gpu_linear_marks_a_backend_that_loses_a_block(tmp_path, monkeypatch, capsys):
    original = sk.reference.bsr_linear

    def loses_last_block(x, values, *rest):
        values = values.clone()
        values[-1] = 0
        return original(x, values, *rest)

    monkeypatch.setattr(sk.reference, "bsr_linear", loses_last_block)
    backends = ",".join(["reference", *(["cpu"] if "cpu" in CPU_BACKENDS else [])])
    assert bench.main(_linear_args(tmp_path, extra=("--backends", backends))) == 1
    _, rows = _read_csv(_suite_csv(tmp_path, "gpu_linear"))
    wrong = next(r for r in rows if r["op"] == "linear_fwd" and r["impl"] == "reference")
    assert wrong["status"] == "MISMATCH" and wrong["ms"] == "" and wrong["speedup"] == ""
    assert float(wrong["rel_err"]) > float(wrong["err_limit"])
    others = [r for r in rows if r["impl"] in ("cpu", "reference") and r is not wrong]
    assert others and all(r["status"] == "ok" and float(r["speedup"]) > 0 for r in others)
    out = capsys.readouterr().out
    assert "!!! MISMATCH linear_fwd block 32 sparsity 0.50 [reference]" in out
    assert "1 case(s) where a sparsekern backend gave a wrong result" in out


def test_check_and_time_outcomes():
    ref = torch.linspace(1.0, 2.0, 7)
    check = lambda out: {"out": common.rel_err(out, ref)}

    def broken():
        raise RuntimeError("no kernel image for this device\nmore")

    impls = [common.Impl("dense", "d", lambda: ref * (1 + 1e-8), check),
             common.Impl("exact", "e", lambda: ref.clone(), check),
             common.Impl("off", "o", lambda: ref * 1.001, check),
             common.Impl("nan", "n", lambda: ref * float("nan"), check),
             common.Impl("broken", "b", broken, check),
             common.Impl("absent", "a", why="no kernel")]
    lines = []
    out = common.check_and_time("case", impls, CPU, reps=1, dtype=torch.float32, report=lines.append)
    assert {k: v.status for k, v in out.items()} == {"dense": "ok", "exact": "ok", "off": "MISMATCH",
                                                     "nan": "MISMATCH", "broken": "error", "absent": "n/a"}
    assert out["exact"].ms > 0 and out["off"].ms is None and out["absent"].note == "no kernel"
    assert out["off"].limits["out"] == common.ERROR_FLOOR[torch.float32]  # the dense error is below the floor
    assert out["broken"].note == "RuntimeError: no kernel image for this device"
    assert any(line.startswith("!!! MISMATCH case [off]") for line in lines)
    assert any(line.startswith("!!! ERROR case [broken]") for line in lines)
    assert common.error_limit(1e-2, torch.bfloat16) == 2e-2
    assert common.error_limit(1e-6, torch.bfloat16) == common.ERROR_FLOOR[torch.bfloat16]
    timed = common.prepare_timing(lambda: None, CPU)
    assert (timed.mode, timed.calls) == ("host", 1)


def test_with_backend_calls_run_under_their_backend_timed_or_not(monkeypatch):
    monkeypatch.setenv("SPARSEKERN_BACKEND", "auto")
    seen = []
    call = common.with_backend("reference", lambda: seen.append(sk.ops.requested_backend()))
    call()
    ms = common.time_interleaved({"ref": call}, CPU, reps=2, warmup=0)
    assert seen == ["reference"] * 3 and ms["ref"] >= 0
    assert os.environ["SPARSEKERN_BACKEND"] == "auto"


def test_backend_choices_report_missing_kernels():
    choices = dict(common.backend_choices("build_layout_index_", CPU, None, ["reference", "triton", "cuda"]))
    assert choices["reference"] is None
    assert "no build_layout_index_ kernel" in choices["triton"] or "TRITON_INTERPRET" in choices["triton"]
    assert "cuda" in choices["cuda"]  # a CUDA backend cannot run on CPU tensors


def test_backend_choices_add_auto_where_it_measures():
    """On CUDA tensors with both Triton and the CUDA kernel, auto's own row shows which one it picked; on CPU
    tensors auto does not measure and adds nothing. (The choice lists what could run, so no GPU is needed.)"""
    assert "auto" not in dict(common.backend_choices("bsr_linear", CPU, torch.float32))
    cuda = torch.device("cuda")
    fast = [b for b in ("triton", "cuda")
            if sk.ops.backend_unavailable_reason(b, "cuda") is None and sk.ops.backend_has_op(b, "bsr_linear")]
    names = [name for name, _ in common.backend_choices("bsr_linear", cuda, torch.float16)]
    assert ("auto" in names) == (len(fast) > 1)
    assert dict(common.backend_choices("bsr_linear", CPU, None, ["auto"])) == {"auto": None}


def test_backend_choices_of_a_pass_need_every_op():
    """A pass (gpu-conv's forward + backward) needs all its kernels: a backend missing one is reported with the
    missing op's name, and auto, which has every op, is never reported missing one (it read n/a on every gpu-conv
    row on the H200 because it was asked whether an 'auto' kernel was compiled)."""
    pass_ops = ("bsr_conv2d", "bsr_conv2d_dgrad", "bsr_linear_dx")
    choices = dict(common.backend_choices(pass_ops, CPU, torch.float32, ["auto", "reference", "cuda"]))
    assert choices["auto"] is None and choices["reference"] is None
    assert "cuda" in choices["cuda"]
    real_has_op = sk.ops.backend_has_op
    lacking = lambda name, op, dtype=None: op != "bsr_conv2d_dgrad" and real_has_op(name, op, dtype)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sk.ops, "backend_has_op", lacking)
        choices = dict(common.backend_choices(pass_ops, CPU, torch.float32, ["auto", "reference"]))
    assert choices == {"auto": None, "reference": "no bsr_conv2d_dgrad kernel for float32"}
    cuda_choices = dict(common.backend_choices(pass_ops, torch.device("cuda"), torch.bfloat16))
    assert cuda_choices.get("auto", None) is None


def test_density_fit_recovers_the_fixed_cost():
    """time = a + b x density is fitted per (op, backend, block); a over dense's time is judged against the goal."""
    rows = [{"op": "linear_fwd", "impl": "triton", "block": 64, "density": d, "ms": 0.02 + 0.3 * d, "dense_ms": 0.3}
            for d in (0.05, 0.1, 0.25, 0.5)]
    rows += [{"op": "linear_fwd", "impl": "cuda", "block": 64, "density": d, "ms": 0.06 + 0.3 * d, "dense_ms": 0.3}
             for d in (0.1, 0.5)]
    rows.append({"op": "linear_fwd", "impl": "dense", "block": 64, "density": None, "ms": 0.3, "dense_ms": 0.3})
    lines = gpu_linear.density_fit(rows, ("triton", "cuda")).splitlines()
    assert lines[1].startswith("  linear_fwd    cuda    block 64 : 0.060 ms + 0.300 ms x density; fixed cost 20.0%")
    assert lines[1].endswith("(MISSED)")
    assert "0.020 ms + 0.300 ms x density; fixed cost 6.7% of dense (met)" in lines[2]


def test_gpu_e2e_suite_runs_on_cpu(tmp_path):
    """The GPU training benchmark on its tiny CPU cases: every method of both models, the training state's size
    (ours a fraction of dense's), the goal lines, the CSV."""
    assert bench.main(["--device", "cpu", "--suite", "gpu-e2e", "--reps", "1", "--sparsities", "0.9",
                       "--no-plots", "--out", str(tmp_path)]) == 0
    _, rows = _read_csv(tmp_path / f"{bench.device_name(CPU)}_e2e.csv")
    assert {(r["model"], r["method"]) for r in rows} == {(m, method) for m in ("resnet18", "mlp_stack")
                                                        for method in ("dense", "simulated", "ours")}
    assert all(r["mode"] == "eager" for r in rows)  # no CUDA graphs on a CPU
    for r in rows:
        state = float(r["state_vs_dense"])
        assert (state == 1.0) if r["method"] == "dense" else (state < 0.2 if r["method"] == "ours" else state > 1.0)


def test_e2e_state_counts_weights_grads_optimizer_state_and_masks():
    model = nn.Linear(10, 4, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loop = e2e.MaskedDenseLoop(model, opt, torch.randn(3, 10), torch.randint(0, 4, (3,)),
                               {"": torch.ones(4, 10)})
    assert e2e.state_bytes(loop) == 40 * 4 * 2  # the weight and its mask
    loop.step()
    assert e2e.state_bytes(loop) == 40 * 4 * 4  # + its gradient and momentum


TINY_LAYERS = [(64, 96), (70, 64), (32, 288)]  # 70 rows: the last block-row is partly padding


def test_gpu_optim_suite_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_optim, "resnet50_sparse_shapes", lambda: TINY_LAYERS)
    assert bench.main(["--device", "cpu", "--suite", "gpu-optim", "--reps", "1", "--out", str(tmp_path)]) == 0
    fields, rows = _read_csv(_suite_csv(tmp_path, "gpu_optim"))
    assert fields == gpu_optim.FIELDS
    sgd = [r for r in rows if r["test"] == "masked_sgd_"]
    assert {(float(r["density"]), r["impl"]) for r in sgd} == {(d, b) for d in (0.1, 0.5, 1.0) for b in CPU_BACKENDS}
    for row in sgd:
        assert row["status"] == "ok" and float(row["gbps"]) > 0 and float(row["frac_copy"]) > 0
        assert float(row["rel_err"]) <= gpu_optim.SGD_TOLERANCE
        assert int(row["bytes"]) == gpu_optim.SGD_BYTES_PER_WEIGHT * int(row["numel"])
        if float(row["density"]) == 1.0:
            assert float(row["time_vs_full"]) == 1.0
    update = {r["impl"]: r for r in rows if r["test"] == "layout_update_"}
    assert update["reference"]["status"] == "ok" and float(update["reference"]["ms"]) > 0
    assert update["reference"]["layers"] == str(len(TINY_LAYERS))
    if "triton" in CPU_BACKENDS:
        assert update["triton"]["status"] == "n/a"  # Triton has no index-build kernel
    if "cpu" in CPU_BACKENDS:
        assert update["cpu"]["status"] == "ok"
    assert [r["impl"] for r in rows if r["test"] == "copy"] == ["torch copy_"]


def test_resnet50_sparse_shapes_are_what_sparsify_makes_sparse():
    shapes = gpu_optim.resnet50_sparse_shapes()
    from sparsekern.models import resnet50
    from sparsekern.train import _stem_filter
    sparse = sk.sparsify(resnet50(), 0.9, 32, distribution="uniform", filter_fn=_stem_filter)
    layers = [m for m in sparse.modules() if isinstance(m, (sk.SparseConv2d, sk.SparseLinear))]
    assert sorted(shapes) == sorted(m.layout.shape for m in layers)
    assert len(shapes) == 53


def test_layout_update_check_catches_unmoved_values_and_a_wrong_index(monkeypatch):
    monkeypatch.setattr(gpu_optim, "resnet50_sparse_shapes", lambda: TINY_LAYERS[:2])
    original = sk.ops.layout_update_
    # rewrites the index but leaves the values and momentum where they were
    monkeypatch.setattr(sk.ops, "layout_update_", lambda layout, mask, block_tensors=(): original(layout, mask, ()))
    lines = []
    rows = gpu_optim.bench_layout_update(CPU, reps=1, backends=None, use_graphs=False, report=lines.append)
    assert {r["impl"]: r["status"] for r in rows}["reference"] == "MISMATCH"
    assert all(r["status"] in ("MISMATCH", "n/a") for r in rows)
    assert any("values or momentum not moved exactly" in line for line in lines)
    monkeypatch.setattr(sk.ops, "layout_update_", original)

    layer = gpu_optim.UpdateLayer((64, 96), CPU, torch.Generator().manual_seed(0))
    with bench.backend("reference"):
        layer.update(1)
        expected = [[t.clone() for t in layer.layout.index_tensors()]]
        layer.update(0)
    assert gpu_optim._update_check("reference", [layer], expected) is None
    expected[0][1][0] += 1  # a wrong col_idx
    assert "index differs" in gpu_optim._update_check("reference", [layer], expected)


def test_conv_layers_of_the_models():
    resnet18 = [(s.in_channels, s.out_channels, s.kernel_size[0], s.stride[0], s.input_size[0], count)
                for s, count in gpu_conv.conv_layers("resnet18", 32)]
    assert resnet18 == bench.RESNET18_CIFAR_CONVS
    resnet50 = gpu_conv.conv_layers("resnet50", 224)
    assert len(resnet50) == 22 and sum(c for _, c in resnet50) == 52  # 53 convolutions, the stem left out
    first, count = resnet50[0]
    assert (first.in_channels, first.out_channels, first.kernel_size, first.input_size, count) == \
        (64, 64, (1, 1), (56, 56), 1)
    assert all(s.in_channels > 3 for s, _ in resnet50)


def _conv_args(tmp_path, backends):
    return ["--device", "cpu", "--suite", "gpu-conv", "--models", "resnet18", "--image-size", "8", "--batch", "2",
            "--dtype", "float32", "--sparsities", "0.5", "--blocks", "32", "--reps", "1", "--backends", backends,
            "--no-plots", "--out", str(tmp_path)]


def test_gpu_conv_suite_runs_on_cpu(tmp_path):
    assert bench.main(_conv_args(tmp_path, NATIVE_OR_REFERENCE)) == 0
    fields, rows = _read_csv(_suite_csv(tmp_path, "gpu_conv"))
    assert fields == gpu_conv.FIELDS
    layers = gpu_conv.conv_layers("resnet18", 8)
    for pass_name in gpu_conv.PASSES:
        mine = [r for r in rows if r["pass"] == pass_name and r["layer"] != "total"]
        assert [r["layer"] for r in mine if r["impl"] == "dense"] == [s.label for s, _ in layers]
        assert all(r["status"] == "ok" and float(r["ms"]) > 0 for r in mine)
        for impl in ("dense", NATIVE_OR_REFERENCE):
            total = next(r for r in rows if r["pass"] == pass_name and r["layer"] == "total" and r["impl"] == impl)
            assert int(total["count"]) == 19
            layer_ms = sum(int(r["count"]) * float(r["ms"]) for r in mine if r["impl"] == impl)
            assert float(total["ms"]) == pytest.approx(layer_ms)


def test_gpu_conv_marks_a_wrong_weight_gradient(tmp_path, monkeypatch, capsys):
    original = sk.reference.bsr_sddmm

    def shifts_first_block(*args):
        out = original(*args)
        out[0] += 1.0  # (zeroing it could go unnoticed: a block that only sees padding has a zero gradient)
        return out

    monkeypatch.setattr(sk.reference, "bsr_sddmm", shifts_first_block)
    assert bench.main(_conv_args(tmp_path, "reference")) == 1
    _, rows = _read_csv(_suite_csv(tmp_path, "gpu_conv"))
    ours = [r for r in rows if r["impl"] == "reference" and r["layer"] != "total"]
    assert all(r["status"] == "ok" for r in ours if r["pass"] == "forward")
    backward = [r for r in ours if r["pass"] == "forward+backward"]
    assert backward and all(r["status"] == "MISMATCH" and "dW rel err" in r["note"] for r in backward)
    assert "!!! MISMATCH resnet18" in capsys.readouterr().out


def test_static_report_runs_the_script_without_the_interpreter(tmp_path, monkeypatch, capsys):
    assert os.path.exists(bench.cli.STATIC_REPORT)  # the repository's benchmarks/triton_static_report.py
    script = tmp_path / "report.py"
    script.write_text("import os, sys\nprint('args', sys.argv[1:])\n"
                      "print('interpret', os.environ.get('TRITON_INTERPRET'))\n")
    monkeypatch.setattr(bench.cli, "STATIC_REPORT", str(script))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert bench.main(["--static", "--static-arch", "90", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "args ['--subset', 'ci', '--arch', '90']" in out and "interpret None" in out
    assert "args" in (tmp_path / "triton_static_report.txt").read_text()
    assert not (tmp_path / f"{bench.device_name(CPU)}.csv").exists()  # --static alone runs no suite


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_suites_run_on_cuda(tmp_path, monkeypatch):
    """The three suites on small GPU cases in bf16: every result correct, dense timed as a replayed CUDA graph."""
    monkeypatch.setattr(gpu_optim, "resnet50_sparse_shapes", lambda: TINY_LAYERS)
    common_args = ["--device", "cuda", "--reps", "2", "--no-plots", "--out", str(tmp_path)]
    assert bench.main(["--suite", "gpu-linear", "--shape", "512,256,256", "--sparsities", "0.9", "--blocks", "32,128",
                       *common_args]) == 0
    assert bench.main(["--suite", "gpu-optim", "--sgd-numel", str(1 << 20), *common_args]) == 0
    assert bench.main(["--suite", "gpu-conv", "--models", "resnet18", "--image-size", "8", "--batch", "4",
                       "--sparsities", "0.9", "--blocks", "32", *common_args]) == 0
    name = bench.device_name(torch.device("cuda"))
    for suite in ("gpu_linear", "gpu_optim", "gpu_conv"):
        _, rows = _read_csv(tmp_path / f"{name}_{suite}.csv")
        ours = [r for r in rows if r["impl"] in sk.ops.BACKENDS]
        assert ours and all(r["status"] in ("ok", "n/a") for r in ours), suite
        assert any(r["status"] == "ok" for r in ours), suite
        if suite != "gpu_optim":
            assert all(r["timing"] == "graph" for r in rows if r["impl"] == "dense" and r.get("layer") != "total")


# -- convergence.py -----------------------------------------------------------------------------------------
def _fake_run(conv, method, optimizer, sparsity, block, seed, accuracy):
    spec = conv.RunSpec(method, optimizer, sparsity, block, seed)
    return {"method": method, "optimizer": optimizer, "sparsity": sparsity, "block": block, "seed": seed,
            "config": spec.config, "test_accuracy": accuracy}


def test_convergence_statistics_on_made_up_numbers():
    conv = _convergence()
    assert conv.t_critical(2) == 4.303 and conv.t_critical(11) == pytest.approx(2.201, abs=0.001)
    assert conv.t_critical(30) == pytest.approx(2.042, abs=0.001)
    mean, std = conv.mean_std([0.80, 0.82, 0.84])
    assert (mean, std) == (pytest.approx(0.82), pytest.approx(0.02))
    # Differences 1, 2, 3 points: mean 2, SE 1/sqrt(3) = 0.577, 95% half-width 4.303 x 0.577 = 2.48 > 2: noise.
    noisy = conv.paired_difference([0.80, 0.82, 0.84], [0.79, 0.80, 0.81])
    assert noisy["mean"] == pytest.approx(0.02) and noisy["se"] == pytest.approx(0.01 / 3 ** 0.5)
    assert noisy["half_width"] == pytest.approx(4.303 * 0.01 / 3 ** 0.5) and noisy["exceeds_noise"] is False
    # The same mean with 0.1-point spread, and its mirror image: beyond the noise, both ways.
    assert conv.paired_difference([0.819, 0.820, 0.821], [0.80] * 3)["exceeds_noise"] is True
    lower = conv.paired_difference([0.80] * 3, [0.819, 0.820, 0.821])
    assert lower["exceeds_noise"] is True and lower["mean"] < 0
    assert conv.paired_difference([0.9], [0.8])["exceeds_noise"] is None  # one seed: no noise estimate

    # SparseOpt gains 2.0 +- 0.1 points under RigL on every seed, nothing under SET; BiDST loses 5 points to RigL.
    runs = []
    for seed, jitter in enumerate((-0.001, 0.0, 0.001)):
        base = 0.80 + 0.01 * seed
        runs += [_fake_run(conv, "rigl", "sgd", 0.9, 16, seed, base),
                 _fake_run(conv, "rigl", "sparseopt", 0.9, 16, seed, base + 0.02 + jitter),
                 _fake_run(conv, "set", "sgd", 0.9, 16, seed, base),
                 _fake_run(conv, "set", "sparseopt", 0.9, 16, seed, base + (0.01, -0.01, 0.0)[seed]),
                 _fake_run(conv, "bidst", "sgd", 0.9, 16, seed, base - 0.05 + jitter),
                 _fake_run(conv, conv.UNSTRUCTURED, "sgd", 0.9, None, seed, base + 0.01 + jitter)]
    rows = {(c["kind"], c["a"]): c for c in conv.comparisons(runs)}
    assert rows[("sparseopt vs sgd", "rigl+sparseopt 90% b16")]["exceeds_noise"] is True
    assert rows[("sparseopt vs sgd", "rigl+sparseopt 90% b16")]["mean"] == pytest.approx(0.02)
    assert rows[("sparseopt vs sgd", "set+sparseopt 90% b16")]["exceeds_noise"] is False
    assert rows[("bidst vs rigl", "bidst+sgd 90% b16")]["mean"] == pytest.approx(-0.05)
    block = rows[("block vs unstructured", "rigl+sgd 90% b16")]
    assert block["b"] == "rigl-unstructured 90%" and block["exceeds_noise"] is True and block["n"] == 3
    assert ("sparseopt vs sgd", "bidst+sparseopt 90% b16") not in rows  # not run: no comparison
    text = "\n".join(conv.findings(conv.comparisons(runs)))
    assert "sparseopt vs sgd: the first higher beyond the seed noise in 1 of 2 settings, lower beyond it in 0" in text
    assert "bidst vs rigl: the first higher beyond the seed noise in 0 of 1 settings, lower beyond it in 1" in text


def test_convergence_grids_and_help(capsys):
    conv = _convergence()
    for name, per_seed in (("gpu", 1 + 3 * 2 * 3 * 2 + 1), ("cpu", 1 + 3 * 2 * 3 + 1), ("tiny", 1 + 3 * 2 + 1)):
        preset = conv.PRESETS[name]
        specs = conv.run_grid(preset)
        assert len(specs) == preset.seeds * per_seed and len(set(specs)) == len(specs)
        assert [s.seed for s in specs] == sorted(s.seed for s in specs)  # seed-major
        assert {s.config for s in specs if s.seed == 0} == {s.config for s in specs if s.seed == preset.seeds - 1}
    assert conv.PRESETS["gpu"].seeds >= 3 and conv.PRESETS["cpu"].seeds >= 3
    assert conv.PRESETS["gpu"].sparsities == (0.9, 0.95, 0.97) and conv.PRESETS["gpu"].blocks == (16, 32)
    with pytest.raises(SystemExit):
        conv.parse_args(["--help"])
    out = capsys.readouterr().out
    assert all(conv.describe(p) in out for p in conv.PRESETS.values())  # the presets as they are
    assert "--estimate" in out and "--report-from" in out


def test_convergence_per_weight_rigl():
    """The unstructured reference keeps each layer's count, masks gradients, and moves weights on update steps."""
    conv = _convergence()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(32 * 4 * 4, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rigl = conv.PerWeightRigL(model, optimizer, sparsity=0.9, update_interval=2, t_end=10)
    stem, conv2, fc = rigl.backward_masks
    assert stem is None  # the 1-channel stem stays dense
    counts = [int(conv2.sum()), int(fc.sum())]
    assert all(0 < c < m.numel() for c, m in zip(counts, (conv2, fc)))
    assert torch.equal(model[2].weight != 0, conv2)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for step in (1, 2):
        before = conv2.clone()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        stepped = rigl()
        assert stepped == (step == 1)  # step 2 updates the mask instead of stepping
        assert torch.all(model[2].weight.grad[~conv2] == 0)
        if stepped:
            optimizer.step()
            assert torch.equal(conv2, before)
    assert [int(conv2.sum()), int(fc.sum())] == counts
    assert 0 < int((conv2 & ~before).sum()) <= round(0.3 / 2 * (1 + math.cos(math.pi * 2 / 10)) * counts[0])
    assert torch.all(model[2].weight[~conv2] == 0)
    assert torch.all(optimizer.state[model[2].weight]["momentum_buffer"][~conv2] == 0)


def test_convergence_tiny_preset_end_to_end(tmp_path, capsys):
    """The tiny preset as CI runs it (two worker processes), then one run redone in this process: same numbers."""
    conv = _convergence()
    runs_dir = tmp_path / "runs"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "convergence.py"), "--preset", "tiny",
                           "--device", "cpu", "--out", str(tmp_path), "--runs-dir", str(runs_dir)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stem = tmp_path / f"convergence_{bench.device_name(CPU)}_tiny"
    saved = json.loads(stem.with_suffix(".json").read_text())
    preset = conv.PRESETS["tiny"]
    assert saved["failed"] == {} and saved["settings"]["preset"] == "tiny"
    results = saved["results"]
    assert len(results) == len(conv.run_grid(preset))
    groups = conv.by_config(results)
    assert all(sorted(r["seed"] for r in runs) == list(range(preset.seeds)) for runs in groups.values())
    updates = sum(conv.is_update_step(s, preset.update_interval, int(0.75 * preset.steps))
                  for s in range(1, preset.steps + 1))
    for r in results:
        assert [p["step"] for p in r["curve"]][-1] == preset.steps and len(r["curve"]) == preset.evals
        assert r["test_accuracy"] == r["curve"][-1]["test_accuracy"]
        for layer in r["layers"].values():
            assert len(layer["moved"]) == updates and all(0 <= m <= layer["active"] for m in layer["moved"])
        if r["method"] in conv.METHODS:
            assert r["unit"] == "blocks" and sum(sum(v["moved"]) for v in r["layers"].values()) > 0
    kinds = [c["kind"] for c in saved["comparisons"]]
    assert sorted(set(kinds)) == ["bidst vs rigl", "bidst vs set", "block vs unstructured", "rigl vs set",
                                  "sparseopt vs sgd"]
    assert kinds.count("sparseopt vs sgd") == 3 and kinds.count("bidst vs rigl") == 2
    assert all(c["n"] == preset.seeds and c["se"] is not None for c in saved["comparisons"])

    text = stem.with_suffix(".md").read_text()
    for heading in ("## Final test accuracy over seeds", "## Paired comparisons", "## What the numbers say",
                    "## Topology: what each mask update moved", "### 90%, block 16", "### 90%, unstructured"):
        assert heading in text
    mean, std = conv.mean_std([r["test_accuracy"] for r in groups["dense"]])
    assert f"| dense | {preset.seeds} | {mean:.2%} | {100 * std:.2f} pts |" in text
    assert "| sparseopt vs sgd | rigl+sparseopt 90% b16 | rigl+sgd 90% b16 | 2 |" in text
    assert "| layers.7.conv2 |" in text and "Unstructured reference: PerWeightRigL" in text
    if conv.pyplot() is not None:
        assert stem.with_suffix(".png").stat().st_size > 0

    # Redo one run in this process (one worker): the others are reused, and it reproduces the pool's numbers.
    redo = runs_dir / "rigl-sparseopt-s90-b16-seed1.json"
    before = json.loads(redo.read_text())["result"]
    redo.unlink()
    assert conv.main(["--preset", "tiny", "--workers", "1", "--device", "cpu", "--out", str(tmp_path),
                      "--runs-dir", str(runs_dir)]) == 0
    assert f"reusing {len(results) - 1} finished runs" in capsys.readouterr().out
    after = json.loads(redo.read_text())["result"]
    assert after["curve"][-1]["test_accuracy"] == before["curve"][-1]["test_accuracy"]
    assert after["layers"] == before["layers"]
    assert conv.main(["--report-from", str(stem.with_suffix(".json"))]) == 0
    assert stem.with_suffix(".md").read_text().startswith("# Convergence study")
