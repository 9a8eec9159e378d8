"""Convergence under one budget: dense vs SET / RigL / BiDST, each with MaskedSGD and SparseOpt, at 90% and
95% block sparsity, plus a block-size study (RigL + SGD at 90% with blocks of 16, 32 and 64).

    .venv/bin/python benchmarks/convergence.py [--epochs 2] [--max-steps-per-epoch 50] [--quick]

The defaults (ResNet-32 on Fashion-MNIST, 2 epochs of 50 steps at batch 64, a mask update every 10 steps,
2000 test images) fit the 15-run grid in about 15 minutes on 2 CPU cores; give a GPU a bigger budget.

Every run is ``sparsekern.train.main`` with the same model, data, batch, learning-rate schedule, step count
and seed; the run folders (checkpoints, logs) go to a temporary folder (--runs-dir keeps them). Writes
``<out>/convergence_<device>.md`` (the table and what the numbers say, derived from them) and
``<out>/convergence_<device>.png`` (test accuracy vs epoch and vs training seconds).

Dense training runs once, with SGD: SparseOpt only rescales the gradients of sparse layers, so on a dense
model it is the same optimizer.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run as a script from a checkout

from sparsekern import train  # noqa: E402
from sparsekern.bench import device_name  # noqa: E402
from sparsekern.bench.plots import pyplot, save_figure  # noqa: E402

SPARSE_METHODS = ("set", "rigl", "bidst")
OPTIMIZERS = ("sgd", "sparseopt")
BLOCK_STUDY = (16, 32, 64)
MAIN_BLOCK = 32
# Accuracy differences below this many points are within what one seed and a short budget can tell apart.
NOISE_POINTS = 1.0


@dataclass(frozen=True)
class RunSpec:
    method: str
    optimizer: str
    sparsity: float
    block: Optional[int]  # None for dense

    @property
    def slug(self) -> str:
        if self.method == "dense":
            return f"dense-{self.optimizer}"
        return f"{self.method}-{self.optimizer}-s{round(self.sparsity * 100)}-b{self.block}"


def run_grid(sparsities: Sequence[float] = (0.9, 0.95), block_study: bool = True) -> List[RunSpec]:
    """Dense once, every sparse method x optimizer x sparsity at block 32, then the other block sizes."""
    specs = [RunSpec("dense", "sgd", 0.0, None)]
    for sparsity in sparsities:
        for method in SPARSE_METHODS:
            for optimizer in OPTIMIZERS:
                specs.append(RunSpec(method, optimizer, sparsity, MAIN_BLOCK))
    if block_study:
        specs += [RunSpec("rigl", "sgd", 0.9, block) for block in BLOCK_STUDY if block != MAIN_BLOCK]
    return specs


def fashion_mnist_with_test_subset(source_dir: str, dest_dir: str, n_test: int) -> str:
    """A Fashion-MNIST folder with the full training set and the first ``n_test`` test images.

    Evaluating the whole 10k test set every epoch costs more than the short training budget on a CPU
    (sparse inference at batch 512 runs at a few ms per image there); the first n test images are close to
    class-balanced.
    """
    import numpy as np
    from sparsekern.data import read_idx

    os.makedirs(dest_dir, exist_ok=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        for suffix in (".gz", ""):
            if os.path.exists(os.path.join(source_dir, name + suffix)):
                link = os.path.join(dest_dir, name + suffix)
                if not os.path.exists(link):
                    os.symlink(os.path.join(os.path.abspath(source_dir), name + suffix), link)
                break
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        path = os.path.join(source_dir, name + ".gz")
        array = read_idx(path if os.path.exists(path) else os.path.join(source_dir, name))[:n_test]
        with open(os.path.join(dest_dir, name), "wb") as f:
            f.write(bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes())
            f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    return dest_dir


def train_argv(spec: RunSpec, args: argparse.Namespace, out: str) -> List[str]:
    argv = ["--model", args.model, "--data", args.data, "--method", spec.method, "--optimizer", spec.optimizer,
            "--epochs", str(args.epochs), "--max-steps-per-epoch", str(args.max_steps_per_epoch),
            "--batch-size", str(args.batch_size), "--update-interval", str(args.update_interval),
            "--device", args.device, "--seed", str(args.seed), "--out", out, "--no-progress"]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    if spec.method != "dense":
        argv += ["--sparsity", str(spec.sparsity), "--block-size", str(spec.block)]
    return argv


def read_log(run_dir: str) -> List[dict]:
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def result_from_run(spec: RunSpec, log: List[dict]) -> dict:
    """One table row (and its curve) from a run's per-epoch log."""
    seconds, curve = 0.0, []
    for record in log:
        seconds += record["epoch_seconds"]
        curve.append({"epoch": record["epoch"], "seconds": seconds, "test_accuracy": record["test_accuracy"]})
    last = log[-1]
    return {"method": spec.method, "optimizer": spec.optimizer, "sparsity": spec.sparsity, "block": spec.block,
            "test_accuracy": last["test_accuracy"],
            "epoch_seconds": sum(r["epoch_seconds"] for r in log) / len(log),
            "images_per_second": last["images_per_second"], "mask_update_overhead": last["mask_update_overhead"],
            "curve": curve}


def run_all(specs: Sequence[RunSpec], args: argparse.Namespace, runs_dir: str) -> List[dict]:
    results = []
    for i, spec in enumerate(specs, 1):
        out = os.path.join(runs_dir, spec.slug)
        print(f"[{i}/{len(specs)}] {spec.slug}", flush=True)
        started = time.perf_counter()
        train.main(train_argv(spec, args, out))
        results.append(result_from_run(spec, read_log(out)))
        print(f"    {results[-1]['test_accuracy']:.4f} test accuracy, {time.perf_counter() - started:.0f} s", flush=True)
    return results


# -- the report --------------------------------------------------------------------------------------------
def _label(r: dict) -> str:
    if r["method"] == "dense":
        return "dense"
    return f"{r['method']}+{r['optimizer']} {r['sparsity']:.0%} b{r['block']}"


def _pts(a: float, b: float) -> str:
    return f"{100 * (a - b):+.1f} pts"


def _find(results, method, optimizer, sparsity, block=MAIN_BLOCK) -> Optional[dict]:
    for r in results:
        if (r["method"], r["optimizer"], r["block"]) == (method, optimizer, block) and \
                abs(r["sparsity"] - sparsity) < 1e-9:
            return r
    return None


def frozen_layers(model: str, in_channels: int, sparsity: float, block: int, drop_fraction: float = 0.3) -> tuple:
    """(layers whose first mask update swaps no block, sparse layers) after ``sparsekern.sparsify`` as train
    does it: a layer of k blocks swaps round(f * k), which is 0 when k is small."""
    import sparsekern as sk
    from sparsekern.models import build_model
    net = sk.sparsify(build_model(model, 10, in_channels), sparsity, block, filter_fn=train._stem_filter)
    counts = [m.layout.nnz_blocks for m in net.modules() if isinstance(m, (sk.SparseConv2d, sk.SparseLinear))]
    return sum(round(drop_fraction * k) == 0 for k in counts), len(counts)


def _tally(claim: str, won: List[str], lost: List[str]) -> List[str]:
    """["<claim> in W of N settings. It did not in ... It did in ..."], or [] where nothing was compared."""
    if not (won or lost):
        return []
    line = f"{claim} in {len(won)} of {len(won) + len(lost)} settings."
    if lost:
        line += " It did not in " + "; ".join(lost) + "."
    if won:
        line += " It did in " + "; ".join(won) + "."
    return [line]


def findings(results: List[dict], frozen: Optional[Dict[tuple, tuple]] = None) -> List[str]:
    """Sentences comparing the runs, each derived from the accuracies and timings in ``results`` (and, if
    given, ``frozen``: {(sparsity, block): (layers that swap no block, sparse layers)})."""
    out = []
    dense = next((r for r in results if r["method"] == "dense"), None)
    sparsities = sorted({r["sparsity"] for r in results if r["method"] != "dense"})

    # BiDST against the better of SET and RigL, per sparsity and optimizer.
    bidst_lost, bidst_won = [], []
    for s in sparsities:
        for opt in OPTIMIZERS:
            bidst = _find(results, "bidst", opt, s)
            baselines = [r for r in (_find(results, "set", opt, s), _find(results, "rigl", opt, s)) if r]
            if bidst is None or not baselines:
                continue
            best = max(baselines, key=lambda r: r["test_accuracy"])
            text = (f"{s:.0%}/{opt}: {bidst['test_accuracy']:.2%} vs {best['method']} {best['test_accuracy']:.2%} "
                    f"({_pts(bidst['test_accuracy'], best['test_accuracy'])})")
            (bidst_won if bidst["test_accuracy"] > best["test_accuracy"] else bidst_lost).append(text)
    out += _tally("BiDST beat the better of SET and RigL", bidst_won, bidst_lost)

    # SparseOpt against MaskedSGD, per method and sparsity.
    so_lost, so_won = [], []
    for s in sparsities:
        for method in SPARSE_METHODS:
            sgd, so = _find(results, method, "sgd", s), _find(results, method, "sparseopt", s)
            if sgd is None or so is None:
                continue
            text = (f"{method} {s:.0%}: {so['test_accuracy']:.2%} vs {sgd['test_accuracy']:.2%} "
                    f"({_pts(so['test_accuracy'], sgd['test_accuracy'])})")
            (so_won if so["test_accuracy"] > sgd["test_accuracy"] else so_lost).append(text)
    out += _tally("SparseOpt beat SGD", so_won, so_lost)

    # Sparse against dense: accuracy and throughput.
    if dense is not None:
        for s in sparsities:
            sparse = [r for r in results if r["method"] != "dense" and abs(r["sparsity"] - s) < 1e-9]
            if not sparse:
                continue
            best = max(sparse, key=lambda r: r["test_accuracy"])
            fastest = max(sparse, key=lambda r: r["images_per_second"])
            out.append(f"At {s:.0%} the best sparse run ({_label(best)}, {best['test_accuracy']:.2%}) is "
                       f"{_pts(best['test_accuracy'], dense['test_accuracy'])} from dense "
                       f"({dense['test_accuracy']:.2%}); the fastest sparse run trains at "
                       f"{fastest['images_per_second']:.0f} images/s, "
                       f"{fastest['images_per_second'] / dense['images_per_second']:.2f}x dense "
                       f"({dense['images_per_second']:.0f} images/s).")

    # Mask-update cost.
    costs = {m: [r["mask_update_overhead"] for r in results if r["method"] == m] for m in SPARSE_METHODS}
    costs = {m: sum(v) / len(v) for m, v in costs.items() if v}
    if costs:
        out.append("Mask updates took " + ", ".join(f"{costs[m]:.1%} ({m})" for m in costs) +
                   " of the training wall time on average.")

    # Block-size study.
    study = sorted((r for r in results if r["method"] == "rigl" and r["optimizer"] == "sgd"
                    and abs(r["sparsity"] - 0.9) < 1e-9), key=lambda r: r["block"])
    if len(study) > 1:
        best = max(study, key=lambda r: r["test_accuracy"])
        out.append("Block size (RigL+SGD, 90%): " + ", ".join(
            f"b{r['block']} {r['test_accuracy']:.2%} at {r['images_per_second']:.0f} images/s" for r in study) +
            f"; the most accurate was block {best['block']}.")

    for (sparsity, block), (n_frozen, n_layers) in sorted((frozen or {}).items()):
        if n_frozen:
            out.append(f"At {sparsity:.0%} with block {block}, {n_frozen} of {n_layers} sparse layers hold so few "
                       f"blocks that even the first update (30% of them) swaps none: SET and RigL can only move "
                       f"blocks in the other layers.")
    for s in sparsities:
        for opt in OPTIMIZERS:
            set_run, rigl_run = _find(results, "set", opt, s), _find(results, "rigl", opt, s)
            if set_run and rigl_run and set_run["test_accuracy"] == rigl_run["test_accuracy"]:
                out.append(f"SET and RigL ({opt}, {s:.0%}) ended with the same test accuracy "
                           f"({set_run['test_accuracy']:.2%}): no mask update changed anything there.")

    disturbed = []
    for r in results:
        per_epoch = [b["seconds"] - a["seconds"] for a, b in zip([{"seconds": 0.0}] + r["curve"], r["curve"])]
        if len(per_epoch) > 1 and max(per_epoch) > 2 * min(per_epoch):
            disturbed.append(f"{_label(r)} ({', '.join(f'{t:.0f}' for t in per_epoch)} s per epoch)")
    if disturbed:
        out.append("Epochs of the same run differing by more than 2x in time mean other jobs shared the CPU: "
                   "the timings of " + "; ".join(disturbed) + " are not comparable.")

    spread = [abs(a - b) for a, b in _pairs(results)]
    if spread:
        close = sum(d < NOISE_POINTS / 100 for d in spread)
        out.append(f"One seed per run and a short budget: {close} of {len(spread)} of the paired comparisons "
                   f"above differ by less than {NOISE_POINTS:.0f} point; without repeats over seeds none of these "
                   f"differences is established, only measured once.")
    return out


def _pairs(results: List[dict]):
    """(accuracy, accuracy) of the comparisons made in findings (BiDST vs best baseline, SparseOpt vs SGD)."""
    sparsities = sorted({r["sparsity"] for r in results if r["method"] != "dense"})
    for s in sparsities:
        for opt in OPTIMIZERS:
            bidst = _find(results, "bidst", opt, s)
            baselines = [r for r in (_find(results, "set", opt, s), _find(results, "rigl", opt, s)) if r]
            if bidst and baselines:
                yield bidst["test_accuracy"], max(r["test_accuracy"] for r in baselines)
        for method in SPARSE_METHODS:
            sgd, so = _find(results, method, "sgd", s), _find(results, method, "sparseopt", s)
            if sgd and so:
                yield so["test_accuracy"], sgd["test_accuracy"]


def format_table(results: List[dict]) -> str:
    lines = ["| method | optimizer | sparsity | block | final test accuracy | epoch seconds | images/s | "
             "mask-update overhead |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        dense = r["method"] == "dense"
        lines.append(f"| {r['method']} | {r['optimizer']} | {'0%' if dense else format(r['sparsity'], '.0%')} | "
                     f"{'-' if dense else r['block']} | {r['test_accuracy']:.2%} | {r['epoch_seconds']:.1f} | "
                     f"{r['images_per_second']:.0f} | {r['mask_update_overhead']:.2%} |")
    return "\n".join(lines)


def write_report(results: List[dict], path: str, settings: Dict[str, object], device: str,
                 plot_name: Optional[str] = None, frozen: Optional[Dict[tuple, tuple]] = None) -> str:
    """The markdown report: settings, the table, and what the numbers say."""
    budget = ", ".join(f"{k} {v}" for k, v in settings.items())
    text = [f"# Convergence under one budget ({device})", "",
            f"Settings: {budget}. Every run: `python -m sparsekern.train` with the same seed, cosine "
            f"learning rate and step count; sparse runs use ERK layer densities and keep the image stem dense. "
            f"Dense runs once with SGD (SparseOpt rescales only sparse layers, so on a dense model it is SGD). "
            f"`epoch seconds` and `images/s` are training time only (evaluation excluded); `mask-update "
            f"overhead` is the share of training wall time spent in mask updates.", "",
            format_table(results), "", "## What we measured", ""]
    text += [f"- {line}" for line in findings(results, frozen)]
    if plot_name:
        text += ["", f"![test accuracy vs epoch and vs training seconds]({plot_name})"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(text) + "\n")
    return path


def plot_curves(results: List[dict], path: str, title: str = "") -> Optional[str]:
    """Test accuracy vs epoch and vs cumulative training seconds, one row per sparsity (dense in every row)."""
    plt = pyplot()
    if plt is None:
        return None
    sparsities = sorted({r["sparsity"] for r in results if r["method"] != "dense"}) or [0.0]
    colors = {"dense": "black", "set": "tab:blue", "rigl": "tab:orange", "bidst": "tab:green"}
    block_styles = {16: (0, (1, 1)), 64: (0, (5, 1, 1, 1))}
    fig, axes = plt.subplots(len(sparsities), 2, figsize=(11, 3.6 * len(sparsities)), squeeze=False)
    for row, s in enumerate(sparsities):
        shown = [r for r in results if r["method"] == "dense" or abs(r["sparsity"] - s) < 1e-9]
        for r in shown:
            style = "--" if r["optimizer"] == "sparseopt" else "-"
            if r["block"] not in (None, MAIN_BLOCK):
                style = block_styles.get(r["block"], ":")
            label = "dense" if r["method"] == "dense" else f"{r['method']}+{r['optimizer']}" + (
                f" b{r['block']}" if r["block"] != MAIN_BLOCK else "")
            for col, key in enumerate(("epoch", "seconds")):
                axes[row][col].plot([p[key] for p in r["curve"]], [100 * p["test_accuracy"] for p in r["curve"]],
                                    linestyle=style, marker="o", markersize=3,
                                    color=colors.get(r["method"], "grey"), label=label)
        for col, xlabel in enumerate(("epoch", "training seconds")):
            ax = axes[row][col]
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{s:.0%} sparse (block {MAIN_BLOCK} unless marked)", fontsize=10)
            ax.grid(alpha=0.3)
        axes[row][1].legend(fontsize=7, loc="lower right")
    return save_figure(plt, fig, path, title, dpi=110)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet32", help="a model of sparsekern.models")
    p.add_argument("--data", default="fashion-mnist", help="dataset of sparsekern.train (--data)")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: sparsekern.train's)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps-per-epoch", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--update-interval", type=int, default=10, help="steps between mask updates")
    p.add_argument("--test-images", type=int, default=2000,
                   help="fashion-mnist only: evaluate on the first N test images (0: all 10000)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 epoch of 10 steps, 90%% sparsity only, no block-size study")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for the .md and .png")
    p.add_argument("--runs-dir", default=None, help="keep the run folders here (default: a temporary folder)")
    p.add_argument("--report-from", default=None, metavar="JSON",
                   help="train nothing: rewrite the .md and .png from a results JSON this script wrote")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.max_steps_per_epoch, args.test_images = 1, 10, min(args.test_images or 512, 512)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    specs = run_grid((0.9,) if args.quick else (0.9, 0.95), block_study=not args.quick)
    device = device_name(torch.device(args.device))
    stem = os.path.join(args.out, f"convergence_{device}{'_quick' if args.quick else ''}")
    if args.report_from:
        with open(args.report_from) as f:
            saved = json.load(f)
        return write_outputs(saved["results"], saved["settings"], saved["run"], device, stem)

    settings = {"model": args.model, "data": args.data, "epochs": args.epochs,
                "steps per epoch": args.max_steps_per_epoch, "batch": args.batch_size,
                "update interval": args.update_interval, "device": f"{args.device} ({device})",
                "threads": torch.get_num_threads(), "test images": args.test_images or "all"}
    run = {k: getattr(args, k) for k in ("model", "data", "epochs", "max_steps_per_epoch", "batch_size")}
    print(f"{len(specs)} runs: " + ", ".join(s.slug for s in specs), flush=True)
    with tempfile.TemporaryDirectory(prefix="convergence-") as tmp:
        runs_dir = args.runs_dir or tmp
        if args.test_images:
            if args.data != "fashion-mnist":
                raise SystemExit("--test-images applies to --data fashion-mnist only")
            from sparsekern.data import FASHION_MNIST_DIR
            args.data_dir = fashion_mnist_with_test_subset(args.data_dir or FASHION_MNIST_DIR,
                                                           os.path.join(tmp, "fashion-mnist"), args.test_images)
        results = run_all(specs, args, runs_dir)
    os.makedirs(args.out, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({"settings": settings, "run": run, "results": results}, f, indent=1)
    return write_outputs(results, settings, run, device, stem)


def write_outputs(results: List[dict], settings: dict, run: dict, device: str, stem: str) -> int:
    """``stem``.png and ``stem``.md from the results."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    png = plot_curves(results, stem + ".png", f"{run['model']} on {run['data']}: {run['epochs']} x "
                      f"{run['max_steps_per_epoch']} steps, batch {run['batch_size']}")
    in_channels = 1 if run["data"] == "fashion-mnist" else 3
    frozen = {(r["sparsity"], r["block"]): frozen_layers(run["model"], in_channels, r["sparsity"], r["block"])
              for r in results if r["method"] != "dense"}
    md = write_report(results, stem + ".md", settings, device, os.path.basename(png) if png else None, frozen)
    print(open(md).read())
    print(f"wrote {md}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
