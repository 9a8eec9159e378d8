"""The training CLI: smoke runs of every method/optimizer, bit-exact resume, the idx reader."""
import gzip
import json
import struct

import numpy as np
import pytest
import torch

from sparsekern import data, demo, train

FAST = ["--data", "synthetic", "--model", "resnet32", "--batch-size", "32", "--max-steps-per-epoch", "3",
        "--block-size", "16", "--update-interval", "2", "--no-progress"]


@pytest.mark.parametrize("method", ["dense", "set", "rigl", "bidst"])
@pytest.mark.parametrize("optimizer", ["sgd", "sparseopt"])
def test_every_method_and_optimizer_trains(tmp_path, method, optimizer):
    summary = train.main(FAST + ["--method", method, "--optimizer", optimizer, "--out", str(tmp_path)])
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["test_accuracy"] == summary["test_accuracy"]
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 3
    if method == "dense":
        assert summary["layer_densities"] == {}
    else:
        densities = summary["layer_densities"]
        assert densities and all(0 < d < 1 for d in densities.values())


def _state(path):
    checkpoint = torch.load(path / "checkpoint.pt", weights_only=False)
    return checkpoint["model"], checkpoint["optimizer"]["state"]


@pytest.mark.parametrize("method", ["set", "bidst"])
def test_resume_is_bit_exact(tmp_path, method):
    args = FAST + ["--method", method, "--optimizer", "sparseopt"]
    train.main(args + ["--epochs", "2", "--out", str(tmp_path / "straight")])
    train.main(args + ["--epochs", "2", "--stop-after", "1", "--out", str(tmp_path / "split")])
    train.main(args + ["--epochs", "2", "--out", str(tmp_path / "split"), "--resume", str(tmp_path / "split")])
    (model_a, opt_a), (model_b, opt_b) = _state(tmp_path / "straight"), _state(tmp_path / "split")
    assert model_a.keys() == model_b.keys()
    assert any(k.endswith("layout.col_idx") for k in model_a)
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    for pid in opt_a:
        for name, value in opt_a[pid].items():
            assert torch.equal(value, opt_b[pid][name]), (pid, name)


def _write_idx(path, array):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_on_generated_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, (n, 28, 28)) for s, n in (("train", 7), ("t10k", 5))}
    labels = {s: rng.integers(0, 10, (len(images[s]),)) for s in images}
    for split in images:
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images[split])
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels[split])
    loaded = data.fashion_mnist(str(tmp_path))
    assert loaded.train_x.shape == (7, 1, 28, 28) and loaded.test_x.shape == (5, 1, 28, 28)
    assert torch.equal(loaded.train_y, torch.from_numpy(labels["train"]))
    restored = loaded.train_x * 0.3530 + 0.2860
    assert torch.allclose(restored * 255, torch.from_numpy(images["train"][:, None]).float(), atol=1e-3)


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        data.fashion_mnist(str(tmp_path))


def test_truncated_idx_file_is_rejected(tmp_path):
    path = tmp_path / "bad-idx.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, 1) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="header says"):
        data.read_idx(str(path))


def test_torchrun_ddp_two_gloo_processes_keep_identical_masks(tmp_path):
    """RigL grows from rank-local gradient scores (different data per rank): only the broadcast of rank 0's
    decision keeps the masks equal."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               "-m", "sparsekern.train", *FAST, "--method", "rigl", "--max-steps-per-epoch", "6", "--device", "cpu", "--out", str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["masks_agree_across_ranks"] is True


def test_demo_trains_dense_and_sparse_alike_and_reports_the_ratio(tmp_path, capsys):
    argv = ["--data", "synthetic", "--model", "resnet32", "--steps", "3", "--batch-size", "32", "--block-size", "16",
            "--update-interval", "2", "--no-progress", "--out", str(tmp_path)]
    result = demo.main(argv)
    dense, sparse = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("dense", "rigl"))
    shared = {k: v for k, v in dense["args"].items() if k not in ("method", "out")}
    assert shared == {k: v for k, v in sparse["args"].items() if k not in ("method", "out")}
    assert dense["layer_densities"] == {} and sparse["layer_densities"]
    assert result["sparse_speedup"] == pytest.approx(sparse["images_per_second"] / dense["images_per_second"])
    assert json.loads((tmp_path / "comparison.json").read_text()) == result
    assert "rigl 90% block 16" in capsys.readouterr().out
    demo.main(argv)  # a second run into the same folder starts its logs afresh
    assert len((tmp_path / "dense" / "log.jsonl").read_text().splitlines()) == 1
