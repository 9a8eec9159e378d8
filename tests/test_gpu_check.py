"""benchmarks/gpu_check.py, the one command of a GPU run: its summary from pytest's junit XML and the suites' CSVs,
the reasons it gives for crashed tests, and its deadline (no GPU needed: the steps are skipped or faked)."""
import importlib.util
import csv
import os
from pathlib import Path

import pytest

from sparsekern.bench import gpu_conv, gpu_linear

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_cuda_kernels.TestOnGpu" name="test_ok" time="0.1"/>
<testcase classname="tests.test_cuda_kernels" name="test_dx[bf16]" time="0.1">
  <failure message="AssertionError: dx rel err 1.0e+00 &gt; limit&#10;second line">trace</failure></testcase>
<testcase classname="tests.test_cuda_conv" name="test_errors_name_the_tensor" time="0.1">
  <failure message="worker 'gw3' crashed while running 'tests/test_cuda_conv.py::test_errors_name_the_tensor'"/>
</testcase>
<testcase classname="tests.test_bench" name="test_skip" time="0"><skipped message="no GPU"/></testcase>
</testsuite></testsuites>"""

FAULT = """Fatal Python error: Segmentation fault

Current thread 0x00007f00 (most recent call first):
  File "{root}/sparsekern/ops.py", line 99 in _run
  File "{root}/tests/test_cuda_conv.py", line 133 in test_errors_name_the_tensor
  File "/usr/lib/python3/site-packages/_pytest/python.py", line 157 in pytest_pyfunc_call
"""


def test_summary_lists_each_failure_and_crash_and_ends_with_the_counts(tmp_path):
    check = gpu_check.Check(str(tmp_path), deadline_s=60)
    check.gpu = "nvidia-h200"
    (tmp_path / "junit.xml").write_text(JUNIT)
    check.read_junit(str(tmp_path / "junit.xml"))
    (tmp_path / "nvidia-h200_gpu_linear.csv").write_text(
        "op,impl,first_call_s\nlinear_fwd,triton,3.5\nlinear_fwd,triton,0.25\nlinear_fwd,dense,\n")
    lines = Path(check.write_summary()).read_text().splitlines()
    assert lines[-1] == "1 passed, 1 failed, 1 crashed"
    assert "  tests.test_cuda_kernels::test_dx[bf16]: AssertionError: dx rel err 1.0e+00 > limit" in lines
    assert any(line.startswith("  tests.test_cuda_conv::test_errors_name_the_tensor: worker 'gw3' crashed")
               for line in lines)
    assert "  nvidia-h200_gpu_linear.csv linear_fwd [triton]: slowest 3.50 s, fastest 0.25 s" in lines
    assert "1 skipped" in lines
    assert (tmp_path / "nvidia-h200_gpu_check.txt").exists()


def test_node_ids_and_crash_frames():
    assert gpu_check._node_id("tests.test_cuda_kernels.TestOnGpu::test_x[1]") == \
        "tests/test_cuda_kernels.py::TestOnGpu::test_x[1]"
    assert gpu_check._crash_frame(FAULT.format(root=ROOT)) == (
        "Segmentation fault at sparsekern/ops.py:99 in _run <- tests/test_cuda_conv.py:133 in "
        "test_errors_name_the_tensor")
    assert gpu_check._crash_frame("all fine") == ""


def test_steps_run_under_the_deadline_and_a_late_step_is_skipped(tmp_path):
    check = gpu_check.Check(str(tmp_path), deadline_s=gpu_check.SUMMARY_RESERVE_S + 12)
    assert check.run("gpu-optim", ["python3", "-c", "print('hello')"]) == 0
    assert check.run("memcheck", ["python3", "-c", "import time; time.sleep(120)"]) == 124  # killed at its limit
    assert check.run("gpu-conv", ["python3", "-c", "print('never')"]) == -1  # nothing left of the deadline
    assert [(name, status) for name, status, _, _ in check.steps] == [
        ("gpu-optim", "ok"), ("memcheck", "out of time"), ("gpu-conv", "skipped")]
    assert "hello" in (tmp_path / "gpu_check.log").read_text()


def test_the_check_writes_at_most_eight_files(tmp_path):
    """Everything the check can write: the summary, the log, junit.xml, one CSV per suite and the layer profile."""
    assert 4 + len(gpu_check.SUITE_ARGS) <= 8  # summary, log, junit.xml, the layer profile
    assert gpu_check.main(["--out", str(tmp_path), "--skip", "build,tests,suites,tma,layers,memcheck",
                           "--deadline", "60"]) == 0
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0] == "gpu_check.log" and files[1].endswith("_gpu_check.txt")
    assert (tmp_path / files[1]).read_text().splitlines()[-1] == "0 passed, 0 failed, 0 crashed"


def test_the_kernels_not_yet_run_on_a_gpu_run_in_processes_of_their_own_outside_dir(tmp_path, monkeypatch):
    """The steps of the kernels never run on a GPU come after the main suites, one process each: the Hopper GEMMs'
    tests, which the main test step leaves out, then the suites with the variants, which write their CSVs outside
    DIR, which keeps its 8 files."""
    commands = []
    monkeypatch.setattr(gpu_check.Check, "run",
                        lambda self, name, command, env=None: commands.append((name, command)) or 0)
    monkeypatch.setattr(gpu_check, "_gpu_facts", lambda python: ("fake-gpu", "9.0a"))
    monkeypatch.setattr(gpu_check, "_install_wheel", lambda python, check, pattern, what: None)
    assert gpu_check.main(["--out", str(tmp_path), "--skip", "build,layers,memcheck"]) == 0
    names = [name for name, _ in commands]
    assert names == ["tests", *gpu_check.SUITE_ARGS, "sm90-tests", *gpu_check.TMA_SUITE_ARGS]
    for name, command in commands:
        if name == "tests":
            assert f"--ignore={gpu_check.SM90_TESTS}" in command
            continue
        if name == "sm90-tests":
            assert gpu_check.SM90_TESTS in command
            continue
        out = command[command.index("--out") + 1]
        if name in gpu_check.TMA_SUITE_ARGS:
            assert "triton-tma" in command[command.index("--backends") + 1] and out != str(tmp_path)
        else:
            assert out == str(tmp_path) and "--backends" not in command
    linear = gpu_check.TMA_SUITE_ARGS["tma-linear"]
    assert set(linear[linear.index("--backends") + 1].split(",")) == {name for pair in gpu_check.VARIANT_PAIRS for name in pair}


def test_the_summary_sets_the_tma_kernels_beside_the_pointer_ones(tmp_path):
    variants = tmp_path / "tma"
    variants.mkdir()
    linear = (["op", "sparsity", "block", "impl", "speedup", "status"],  # the suites' own columns, in part
              [["linear_fwd", "0.9", "64", "dense", "1.0", "ok"], ["linear_fwd", "0.9", "64", "triton", "3.61", "ok"],
               ["linear_fwd", "0.9", "64", "triton-tma", "4.80", "ok"],
               ["linear_fwd", "0.9", "64", "cuda", "1.30", "ok"], ["linear_fwd", "0.9", "64", "cuda-sm90", "3.90", "ok"]])
    conv = (["model", "layer", "sparsity", "block", "pass", "impl", "speedup", "status"],
            [["resnet50", "64->64 k3 s1 56x56", "0.9", "32", "forward", "triton-tma", "1.9", "ok"],
             ["resnet50", "total", "0.9", "32", "forward", "triton", "1.18", "ok"],
             ["resnet50", "total", "0.9", "32", "forward", "triton-tma", "", "MISMATCH"]])
    for name, (fields, rows) in (("x_gpu_linear.csv", linear), ("x_gpu_conv.csv", conv)):
        with open(variants / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(fields)
            writer.writerows(rows)
    assert set(linear[0]) <= set(gpu_linear.FIELDS) and set(conv[0]) <= set(gpu_conv.FIELDS)
    check = gpu_check.Check(str(tmp_path), deadline_s=60)
    check.variant_dir = str(variants)
    text = open(check.write_summary()).read()
    assert "  forward resnet50, sparsity 0.9, block 32: triton 1.18x, triton-tma MISMATCH" in text
    assert ("  linear_fwd, sparsity 0.9, block 64: triton 3.61x, triton-tma 4.80x; cuda 1.30x, cuda-sm90 3.90x"
            in text)
    assert "56x56" not in text  # layers other than the totals stay in the log
