"""``python -m sparsekern.demo``: the main job's training half, dense and block-sparse side by side.

Trains the same model twice with ``python -m sparsekern.train``: once dense, once with a DST method at the
given block sparsity, with the same seed, data order, step count and learning-rate schedule, then prints both
runs' test accuracy and training throughput (images/s over the whole run, mask updates included) and their
ratio. Default: the CIFAR-style ResNet-18 (64-512 channels) on Fashion-MNIST, RigL at 90%, block 32: a model
wide enough that its 32x32 blocks are real work, which is where block sparsity pays.
Writes DIR/dense/ and DIR/<method>/ (each run's summary.json, log.jsonl, checkpoint.pt) and DIR/comparison.json.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from sparsekern import train
from sparsekern.data import DATASETS
from sparsekern.models import MODELS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sparsekern.demo", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="resnet18")
    p.add_argument("--data", choices=DATASETS, default="fashion-mnist")
    p.add_argument("--method", choices=sorted(train.METHODS), default="rigl")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=300, help="training steps of each run")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--update-interval", type=int, default=50, help="steps between mask updates")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def train_args(args: argparse.Namespace, method: str) -> list:
    """The training CLI's arguments for one of the two runs: everything but the method is shared."""
    argv = ["--model", args.model, "--data", args.data, "--method", method, "--sparsity", str(args.sparsity),
            "--block-size", str(args.block_size), "--epochs", "1", "--max-steps-per-epoch", str(args.steps),
            "--batch-size", str(args.batch_size), "--update-interval", str(args.update_interval),
            "--device", args.device, "--seed", str(args.seed), "--out", os.path.join(args.out, method)]
    return argv + (["--no-progress"] if args.no_progress else [])


def comparison_table(runs: dict) -> str:
    """Both runs as rows, with the sparse run's throughput as a multiple of dense's."""
    dense_rate = runs["dense"]["images_per_second"]
    lines = [f"{'run':<28} {'test accuracy':>13} {'images/s':>9} {'vs dense':>9}"]
    for summary in runs.values():
        rate = summary["images_per_second"]
        lines.append(f"{summary['label']:<28} {summary['test_accuracy']:>13.4f} {rate:>9.1f} "
                     f"{rate / dense_rate:>8.2f}x")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    runs = {}
    for method in ("dense", args.method):
        label = "dense" if method == "dense" else f"{method} {args.sparsity:.0%} block {args.block_size}"
        print(f"== {args.model}, {label}: {args.steps} steps of batch {args.batch_size} on {args.device}",
              flush=True)
        summary = train.main(train_args(args, method))
        runs[method] = {"label": label, "test_accuracy": summary["test_accuracy"],
                        "images_per_second": summary["images_per_second"]}
    table = comparison_table(runs)
    speedup = runs[args.method]["images_per_second"] / runs["dense"]["images_per_second"]
    print(f"\n{args.model}, {args.steps} steps each, same seed and data order, training throughput with mask "
          f"updates included:\n{table}")
    result = {"model": args.model, "device": args.device, "steps": args.steps, "batch_size": args.batch_size,
              "runs": runs, "sparse_speedup": speedup}
    with open(os.path.join(args.out, "comparison.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}/comparison.json")
    return result


if __name__ == "__main__":
    main()
