"""The benchmark tools on tiny shapes: bench.py's training loops, tables, CSV and plots, its --help, and
convergence.py's report writer on made-up run results."""
import csv
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import sparsekern as sk
from sparsekern import bench

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
    for flag in ("--quick", "--skip-e2e", "--skip-kernels", "--no-plots", "--e2e-reps"):
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
    monkeypatch.setattr(bench, "e2e_cases", lambda device, quick: [TINY])
    assert bench.main(["--quick", "--skip-kernels", "--e2e-reps", "1", "--out", str(tmp_path)]) == 0
    name = bench.device_name(CPU)
    assert (tmp_path / f"{name}_e2e.csv").exists()
    assert not (tmp_path / f"{name}.csv").exists()  # the kernel CSV is left alone
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / f"{name}_e2e.png").exists()


# -- convergence.py -----------------------------------------------------------------------------------------
def _fake_log(accuracies, seconds=10.0, rate=100.0, overhead=0.01):
    return [{"epoch": i + 1, "step": 50 * (i + 1), "test_accuracy": a, "epoch_seconds": seconds,
             "images_per_second": rate, "mask_update_overhead": overhead} for i, a in enumerate(accuracies)]


def _fake_results(conv):
    acc = {("set", "sgd"): 0.80, ("set", "sparseopt"): 0.81, ("rigl", "sgd"): 0.82, ("rigl", "sparseopt"): 0.79,
           ("bidst", "sgd"): 0.78, ("bidst", "sparseopt"): 0.83}
    results = [conv.result_from_run(conv.RunSpec("dense", "sgd", 0.0, None), _fake_log([0.7, 0.85], rate=300.0,
                                                                                        overhead=0.0))]
    for spec in conv.run_grid((0.9,), block_study=True):
        if spec.method == "dense":
            continue
        final = acc[(spec.method, spec.optimizer)] - (0.01 if spec.block == 64 else 0.0)
        results.append(conv.result_from_run(spec, _fake_log([final - 0.1, final])))
    return results


def test_convergence_grid():
    conv = _convergence()
    specs = conv.run_grid()
    assert len(specs) == 1 + 3 * 2 * 2 + 2
    assert sum(s.method == "dense" for s in specs) == 1
    assert {s.block for s in specs if s.method == "rigl" and s.optimizer == "sgd" and s.sparsity == 0.9} == \
        {16, 32, 64}
    argv = conv.train_argv(specs[1], conv.parse_args([]), "/tmp/x")
    assert argv[argv.index("--sparsity") + 1] == "0.9" and argv[argv.index("--block-size") + 1] == "32"
    assert "--sparsity" not in conv.train_argv(specs[0], conv.parse_args([]), "/tmp/x")


def test_convergence_report_from_fake_runs(tmp_path):
    conv = _convergence()
    results = _fake_results(conv)
    assert results[0]["curve"][-1]["seconds"] == pytest.approx(20.0)
    path = conv.write_report(results, str(tmp_path / "report.md"), {"epochs": 2}, "fake-cpu", "plot.png")
    text = open(path).read()
    assert "| dense | sgd | 0% | - | 85.00% |" in text
    assert "| rigl | sgd | 90% | 16 | 82.00% |" in text
    # derived from the numbers: BiDST lost with sgd (78% vs RigL 82%) and won with sparseopt (83% vs 81%)
    assert "BiDST beat the better of SET and RigL in 1 of 2 settings" in text
    assert "90%/sgd: 78.00% vs rigl 82.00% (-4.0 pts)" in text
    # SparseOpt: +1 (set), -3 (rigl), +5 (bidst)
    assert "SparseOpt beat SGD in 2 of 3 settings. It did not in rigl 90%: 79.00% vs 82.00% (-3.0 pts)" in text
    assert "the most accurate was block 16" in text  # 16 and 32 tie at 82%; the first wins
    assert "![" in text and "plot.png" in text


def test_convergence_plot_and_test_subset(tmp_path):
    conv = _convergence()
    pytest.importorskip("matplotlib")
    png = conv.plot_curves(_fake_results(conv), str(tmp_path / "curves.png"), "fake")
    assert png and os.path.getsize(png) > 0

    import gzip
    import numpy as np
    from sparsekern.data import fashion_mnist
    source = tmp_path / "source"
    source.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("t10k", 5)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28))), ("labels-idx1", np.arange(n))):
            header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
            with gzip.open(source / f"{split}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + array.astype(np.uint8).tobytes())
    subset = conv.fashion_mnist_with_test_subset(str(source), str(tmp_path / "subset"), 3)
    full, cut = fashion_mnist(str(source)), fashion_mnist(subset)
    assert torch.equal(cut.train_x, full.train_x) and torch.equal(cut.test_y, full.test_y[:3])
    assert torch.equal(cut.test_x, full.test_x[:3])
