"""`python -m sparsekern.info`: runs, and reports versions, every op and the backends' availability."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsekern as sk

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_info(**env_overrides):
    env = {k: v for k, v in os.environ.items() if k != "SPARSEKERN_BACKEND"}
    env.update(env_overrides)
    result = subprocess.run([sys.executable, "-m", "sparsekern.info"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def info_output():
    return run_info()


def test_versions(info_output):
    assert re.search(rf"^torch\s+{re.escape(torch.__version__)}\b", info_output, re.M)
    assert re.search(rf"^sparsekern\s+{re.escape(sk.__version__)}$", info_output, re.M)
    assert re.search(r"^python\s+\d+\.\d+\.\d+$", info_output, re.M)
    assert "SPARSEKERN_BACKEND=auto" in info_output
    # the native extension line says either what it was built with or why it did not load
    expected = "built against torch" if sk._native.LOADED else "NOT LOADED"
    assert re.search(rf"^sparsekern\._C\s+{expected}", info_output, re.M)


def test_every_op_listed(info_output):
    for op in sk.ops.OPS:
        line = re.search(rf"^\s+{re.escape(op)}\s+auto -> cpu: (\w+)", info_output, re.M)
        assert line, op
        assert line.group(1) == sk.ops.select_backend(op, torch.device("cpu")), op


def test_backend_availability_lines(info_output):
    lines = re.findall(r"^\s+(\w+)\s+on (cpu|cuda)\s+(available|unavailable: \S.*)$", info_output, re.M)
    found = {(backend, device): status for backend, device, status in lines}
    for backend in sk.ops.BACKENDS:
        assert any(b == backend for b, _ in found), backend
    assert found[("reference", "cpu")] == "available"
    # the CPU backend's line agrees with what the ops see in this process
    why = sk.ops.backend_unavailable_reason("cpu", "cpu")
    assert found[("cpu", "cpu")] == ("available" if why is None else f"unavailable: {why}")


def test_backend_override_is_reported():
    output = run_info(SPARSEKERN_BACKEND="reference")
    assert "SPARSEKERN_BACKEND=reference" in output
    for op in sk.ops.OPS:
        assert re.search(rf"^\s+{re.escape(op)}\s+auto -> cpu: reference\b", output, re.M), op


def test_kernels_awaiting_a_gpu_are_listed_and_exist(info_output):
    import importlib
    pytest.importorskip("triton")
    from sparsekern import triton_kernels as tk
    from sparsekern.bench import common
    section = info_output.split("kernels awaiting a GPU run")[1].split("\n\n")[0]
    assert tk.TMA_ENV in section and all(variant in section for variant in common.VARIANTS)
    for module in ("linear_tma", "wgrad_tma", "conv_tma"):
        assert f"triton_kernels.{module}" in section
        names = dir(importlib.import_module(f"sparsekern.triton_kernels.{module}"))
        assert any(name.startswith("launch_") for name in names)
    for op in common.VARIANTS["triton-tma"].ops:  # every op the variant changes is named
        assert op in section
