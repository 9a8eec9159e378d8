"""benchmarks/conv_floors.py: the floors of one hand-checked layer, and the script end to end on a tiny CSV
(CPU only, standard library; no kernels run)."""
import csv
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "conv_floors.py"
spec = importlib.util.spec_from_file_location("conv_floors", SCRIPT)
conv_floors = importlib.util.module_from_spec(spec)
sys.modules["conv_floors"] = conv_floors  # dataclasses look their module up while the class is built
spec.loader.exec_module(conv_floors)

# ResNet-50's first 1x1 expansion at 224 px: 64 -> 256 channels on 56x56, batch 128, bf16, 90% sparse, block 32.
LABEL = "64->256 k1 s1 56x56"
M = 128 * 56 * 56  # 401_408 output pixels
X_BYTES = M * 64 * 2  # 51_380_224: the input, bf16
Y_BYTES = M * 256 * 2  # 205_520_896: the output (and dY)
# The filter [256, 64] is 8 x 2 blocks of 32; 10% of 16 blocks is 1.6, kept as 2 (density 0.125).
NNZ = 2
VALUES_BYTES = NNZ * 32 * 32 * 2  # 4_096
FLOPS = 2 * M * NNZ * 32 * 32  # 1_644_167_168 = 2 * M * 256 * 64 * 0.125
# A chunk of 32 input channels is covered by the 8 blocks of its block-column: read unless none of them is stored,
# which happens for C(16 - 8, 2) of the C(16, 2) = 120 equally likely layouts: 28. A block-row (32 channels of dY)
# has 2 blocks: empty for C(14, 2) = 91 layouts of 120.
X_READ = 1 - 28 / 120
DY_READ = 1 - 91 / 120


def shape():
    return conv_floors.ConvShape.from_label(LABEL)


def test_label_and_geometry():
    s = shape()
    assert (s.cin, s.cout, s.kernel, s.stride, s.height, s.width, s.pad) == (64, 256, 1, 1, 56, 56, 0)
    assert s.out_hw == (56, 56) and s.label == LABEL and s.family == "1x1 expansion"
    assert conv_floors.block_grid(s, 32) == (8, 2)
    assert conv_floors.blocks_for_density(0.1, 16) == NNZ
    # Strided layers: out = (H + 2 * (k // 2) - k) // s + 1; a 1x1 stride-2 conv reads one pixel in four.
    down = conv_floors.ConvShape.from_label("256->512 k1 s2 56x56")
    assert down.out_hw == (28, 28) and down.input_pixels_read == 28 * 28
    three = conv_floors.ConvShape.from_label("128->128 k3 s2 56x56")
    assert three.out_hw == (28, 28) and three.pad == 1 and three.input_pixels_read == 56 * 56


def test_hand_checked_floors_full_reads():
    costs = conv_floors.pass_costs(shape(), batch=128, block=32, nnz=NNZ, elem_bytes=2, full_reads=True)
    assert costs["forward"].flops == costs["dgrad"].flops == costs["wgrad"].flops == FLOPS == 1_644_167_168
    # forward: X + values + row_ptr (9) and col_idx (2) int32 -> Y
    assert costs["forward"].bytes == X_BYTES + VALUES_BYTES + (9 + 2) * 4 + Y_BYTES == 256_905_260
    # dgrad: dY + values + col_ptr (3), row_idx (2), perm (2) -> dX
    assert costs["dgrad"].bytes == Y_BYTES + VALUES_BYTES + (3 + 2 + 2) * 4 + X_BYTES == 256_905_244
    # wgrad: dY + X + coo_row (2), col_idx (2) -> dW values
    assert costs["wgrad"].bytes == Y_BYTES + X_BYTES + 4 * 4 + VALUES_BYTES == 256_905_232
    seconds, bound = costs["forward"].floor(781, 4.3)
    assert bound == "m" and seconds == pytest.approx(256_905_260 / 4.3e12)  # 59.7 us; FLOPs alone: 2.1 us
    assert costs["forward"].flops / 781e12 == pytest.approx(2.105e-6, rel=1e-3)
    assert costs["forward"].intensity == pytest.approx(6.4, rel=1e-2)


def test_hand_checked_floors_touched_reads():
    assert conv_floors.read_fractions(shape(), 32, NNZ) == (pytest.approx(X_READ), pytest.approx(DY_READ))
    costs = conv_floors.pass_costs(shape(), batch=128, block=32, nnz=NNZ, elem_bytes=2)
    assert costs["forward"].bytes == pytest.approx(X_BYTES * X_READ + VALUES_BYTES + 44 + Y_BYTES)
    assert costs["dgrad"].bytes == pytest.approx(Y_BYTES * DY_READ + VALUES_BYTES + 28 + X_BYTES)
    assert costs["wgrad"].bytes == pytest.approx(Y_BYTES * DY_READ + X_BYTES * X_READ + 16 + VALUES_BYTES)
    assert costs["backward, dY once"].bytes == pytest.approx(costs["dgrad"].bytes + costs["wgrad"].bytes
                                                             - Y_BYTES * DY_READ)
    # No blocks: nothing to read, the results are still written.
    empty = conv_floors.pass_costs(shape(), batch=128, block=32, nnz=0, elem_bytes=2)
    assert empty["forward"].bytes == Y_BYTES + 9 * 4 and empty["wgrad"].bytes == 0
    assert empty["wgrad"].floor(781, 4.3) == (0.0, "-")


def test_hand_checked_dense_floors():
    costs = conv_floors.pass_costs(shape(), batch=128, block=32, nnz=None, elem_bytes=2)
    assert costs["forward"].flops == 2 * M * 256 * 64 == 13_153_337_344
    assert costs["forward"].bytes == X_BYTES + 256 * 64 * 2 + Y_BYTES == 256_933_888
    assert costs["wgrad"].bytes == Y_BYTES + X_BYTES + 256 * 64 * 2
    assert costs["forward"].floor(781, 4.3)[1] == "m"  # dense 1x1 64->256 is memory-bound too (51 FLOP/byte)
    assert costs["forward"].intensity == pytest.approx(51.2, rel=1e-3)
    # A 3x3 512 -> 512 on 7x7 is compute-bound dense: 2 * 6272 * 512 * 4608 FLOPs over 781 TFLOP/s.
    big = conv_floors.ConvShape.from_label("512->512 k3 s1 7x7")
    seconds, bound = conv_floors.pass_costs(big, 128, 32, None)["forward"].floor(781, 4.3)
    assert bound == "c" and seconds == pytest.approx(2 * 6272 * 512 * 4608 / 781e12)


FIELDS = ["model", "layer", "count", "batch", "input", "dtype", "sparsity", "block", "density", "pass", "impl",
          "timing", "ms", "dense_ms", "speedup", "frac_ideal", "rel_err", "err_limit", "status", "note"]


def write_csv(path, fwd_ratio=1.5, bwd_ratio=5.0):
    """Two layers; triton at fwd_ratio x its forward floor and bwd_ratio x its backward floor, cuda missing its
    backward on the first layer (an error row), dense at its floors."""
    rows = []
    for label, count in ((LABEL, 4), ("256->256 k3 s1 14x14", 5)):
        s = conv_floors.ConvShape.from_label(label)
        n_rows, n_cols = conv_floors.block_grid(s, 32)
        nnz = conv_floors.blocks_for_density(0.1, n_rows * n_cols)
        layer = conv_floors.Layer(s, count, nnz, nnz / (n_rows * n_cols), {}, [])
        f = conv_floors.layer_floors(layer, 128, 32, 2, conv_floors.DEFAULT_TFLOPS, conv_floors.DEFAULT_TBPS)
        cuda_bwd = None if count == 4 else 3 * f.floor_ms("cuda", "backward")
        times = {"triton": (fwd_ratio * f.floor_ms("triton", "forward"), bwd_ratio * f.floor_ms("triton", "backward")),
                 "cuda": (2 * f.floor_ms("cuda", "forward"), cuda_bwd),
                 "dense": (f.floor_ms("dense", "forward"), f.floor_ms("dense", "backward"))}
        for impl, (fwd, bwd) in times.items():
            for pass_name, ms in (("forward", fwd), ("forward+backward", None if bwd is None else fwd + bwd)):
                rows.append({"model": "resnet50", "layer": label, "count": count, "batch": 128, "input": "224x224",
                             "dtype": "bfloat16", "sparsity": 0.9, "block": 32, "density": round(layer.density, 4),
                             "pass": pass_name, "impl": impl, "timing": "graph" if ms else "",
                             "ms": "" if ms is None else repr(ms), "status": "ok" if ms else "error",
                             "note": "" if ms else "RuntimeError: something"})
        rows.append({"model": "resnet50", "layer": label, "count": count, "batch": 128, "input": "224x224",
                     "dtype": "bfloat16", "sparsity": 0.9, "block": 32, "density": 0.1, "pass": "forward",
                     "impl": "auto", "status": "n/a", "note": "no kernel"})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def test_script_on_a_tiny_csv(tmp_path, capsys):
    path = tmp_path / "tiny_gpu_conv.csv"
    write_csv(path)
    assert conv_floors.main(["--csv", str(path)]) == 0
    out = capsys.readouterr().out
    assert "### Floors per pass" in out and "### Measured vs floor" in out and "### Per family" in out
    layer_rows = [line for line in out.splitlines() if line.startswith(f"| {LABEL} |")]
    assert len(layer_rows) == 2  # one row in the floors table, one in the measured table
    measured = layer_rows[1]
    assert "(1.5x)" in measured and "(5.0x)" in measured and "triton bwd 5.0x" in measured
    assert "cuda fwd 2.0x" in measured  # its backward is missing: the forward is the only ratio it has
    assert "incomplete" in out and "cuda backward over the 1 of 2 layers it timed" in out
    assert "| 1x1 expansion | 4 |" in out and "| 3x3 s1 | 5 |" in out
    assert "at most" in out and "over cuDNN at these floors" in out


def test_script_runs_as_a_program(tmp_path):
    path = tmp_path / "tiny_gpu_conv.csv"
    write_csv(path)
    run = subprocess.run([sys.executable, str(SCRIPT), "--csv", str(path), "--tbps", "4.8", "--full-reads"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "4.8 TB/s" in run.stdout and "ridge point 163 FLOP/byte" in run.stdout
    assert "read X and dY whole" in run.stdout
    # No rows at 95%: the floors alone.
    run = subprocess.run([sys.executable, str(SCRIPT), "--csv", str(path), "--sparsity", "0.95"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "floors only" in run.stdout and "### Measured vs floor" not in run.stdout
    assert "| 64->256 k1 s1 56x56 | 4 | 401408 | 1 (0.062) |" in run.stdout  # 5% of 16 blocks: 0.8 -> 1
    help_run = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert help_run.returncode == 0 and "--full-reads" in help_run.stdout and "--tbps" in help_run.stdout


def test_labels_match_the_suite_layers():
    """The labels parsed here give the suite's own ResNet-50 convolutions (padding kernel // 2 included)."""
    pytest.importorskip("torch")
    try:
        from sparsekern.bench.gpu_conv import conv_layers
    except ImportError as e:  # pragma: no cover - the package is importable wherever the other tests run
        pytest.skip(f"sparsekern.bench.gpu_conv: {e}")
    layers = conv_layers("resnet50", 224)
    assert len(layers) == 22 and sum(count for _, count in layers) == 52
    for suite_shape, _ in layers:
        parsed = conv_floors.ConvShape.from_label(suite_shape.label)
        assert (parsed.pad, parsed.pad) == tuple(suite_shape.padding)
        assert suite_shape.kernel_size == (parsed.kernel,) * 2 and suite_shape.stride == (parsed.stride,) * 2
        assert suite_shape.dilation == (1, 1) and suite_shape.groups == 1
        assert math.prod(suite_shape.input_size) == parsed.height * parsed.width
