"""Mask-update cost of SET, RigL and BiDST next to the training-step time.

    python benchmarks/bench_dst.py [--device cuda] [--batch-size 64] [--image-size 224] [--interval 100]

ResNet-50 made block-sparse (sparsekern.sparsify, ERK, image stem dense), MaskedSGD. For each method it times
the training step (forward, backward, optimizer step) and, separately, what an update adds: the extra cost of
the update step's backward with gradient-score capture (RigL, BiDST) plus ``dst.update`` itself (prune,
grow, layout_update_ of values and momentum for every layer), and what every step adds (BiDST's score
accumulation in ``observe``). The overhead column is the update cost spread over ``--interval`` steps plus
the per-step cost, as a share of training time. Medians of repeated runs; CUDA events on a GPU.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern.bench.common import time_once
from sparsekern.models import resnet50
from sparsekern.train import _stem_filter


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 on GPU, 4 on CPU")
    p.add_argument("--image-size", type=int, default=None, help="default: 224 on GPU, 112 on CPU")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--interval", type=int, default=100, help="steps between mask updates (ΔT)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    batch = args.batch_size or (64 if device.type == "cuda" else 4)
    size = args.image_size or (224 if device.type == "cuda" else 112)

    torch.manual_seed(0)
    model = sk.sparsify(resnet50(num_classes=1000), args.sparsity, args.block_size, "erk", _stem_filter).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = sk.optim.MaskedSGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    train_step()  # warm-up (and momentum buffers exist, as in a real update)
    step_ms = statistics.median(time_once(train_step, device) for _ in range(args.repeats))
    print(f"ResNet-50 {size}px batch {batch}, {args.sparsity:.0%} sparse, block {args.block_size}, on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}: "
          f"training step {step_ms:.1f} ms (median of {args.repeats})")
    print(f"{'method':<8}{'per step ms':>12}{'capture ms':>12}{'update ms':>12}{'per update ms':>15}"
          f"{'overhead @ΔT=' + str(args.interval):>18}")
    for method in (sk.dst.SET, sk.dst.RigL, sk.dst.BiDST):
        dst = method(model, optimizer, update_interval=1, drop_fraction=0.3, t_end=10**9)
        captures, updates, observes = [], [], []
        for _ in range(args.repeats):
            dst._arm_capture()  # the next step is an update step
            capture_ms = time_once(train_step, device) - step_ms if dst.needs_grad_scores else 0.0
            if not dst.needs_grad_scores:
                train_step()
            observes.append(time_once(dst.observe, device))
            updates.append(time_once(lambda: dst.update(dst.drop_fraction), device))
            captures.append(max(capture_ms, 0.0))
        per_step = statistics.median(observes)
        per_update = statistics.median(captures) + statistics.median(updates)
        overhead = (per_update + args.interval * per_step) / (args.interval * step_ms)
        print(f"{method.__name__:<8}{per_step:>12.2f}{statistics.median(captures):>12.1f}"
              f"{statistics.median(updates):>12.1f}{per_update:>15.1f}{overhead:>17.2%}")


if __name__ == "__main__":
    main()
