"""Optimizer-step time for a ResNet-50's worth of sparse parameters: MaskedSGD vs dense SGD + mask multiply.

    python benchmarks/bench_optimizer.py [--device cuda|cpu] [--quick] [--sparsities 0.5,0.9,0.95]

ResNet-50 (sparsekern.models.resnet50, 1000 classes) is made block-sparse with sparsekern.sparsify (ERK, block
32, the 3-channel stem kept dense) at each sparsity. Every parameter gets a random gradient, then:

- ours: ``sparsekern.optim.MaskedSGD`` over the compact values and the dense parameters (BN, stem, ...), one
  fused pass per tensor (SPARSEKERN_BACKEND, default auto: the native kernel of the device);
- dense: what DST code does today, ``torch.optim.SGD(foreach=True)`` over the dense model followed by the mask
  multiply ``torch._foreach_mul_(weights, masks)`` of every sparse layer.

Both use momentum 0.9 and weight decay 5e-5. Times are medians of ``--repeats`` timed steps after warm-up,
the two taking turns (CUDA events on a GPU, perf_counter on the CPU). On a GPU the table adds our achieved bandwidth, from the
bytes a fused step must move (read param, grad and momentum buffer; write param and buffer), against a
measured device-to-device copy. ``--quick`` keeps only the stem and the first two stages (about 1.4 M weights).
"""
from __future__ import annotations

import argparse
import copy
import os

import torch
from torch import nn

import sparsekern as sk
from sparsekern import ops
from sparsekern.bench.common import copy_bandwidth_gbps, time_interleaved
from sparsekern.models import resnet50
from sparsekern.optim import MaskedSGD
from sparsekern.train import _stem_filter

SPARSE = (sk.SparseLinear, sk.SparseConv2d)
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-5


def build_dense(quick: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = resnet50(num_classes=1000)
    if quick:
        model = nn.Sequential(model.stem, model.layers[:7])  # stem, then the 3 + 4 bottlenecks of stages 1-2
    return model


def _give_grads(params, seed: int) -> None:
    generator = torch.Generator(device=params[0].device).manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype).mul_(1e-3)


def bench_sparsity(sparsity: float, args, device: torch.device) -> dict:
    dense = build_dense(args.quick).to(device)
    sparse = sk.sparsify(copy.deepcopy(dense).cpu(), sparsity, args.block_size, filter_fn=_stem_filter).to(device)

    # Dense baseline: SGD over the dense model, then the mask multiply of every sparsified layer.
    dense_modules = dict(dense.named_modules())
    masked_weights, masks = [], []
    for name, layer in sparse.named_modules():
        if isinstance(layer, SPARSE):
            weight = dense_modules[name].weight
            masked_weights.append(weight)
            masks.append((layer.to_dense().weight.detach() != 0).to(device=device, dtype=weight.dtype))
    dense_params = [p for p in dense.parameters()]
    _give_grads(dense_params, seed=1)
    baseline = torch.optim.SGD(dense_params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, foreach=True)

    @torch.no_grad()
    def dense_step():
        baseline.step()
        torch._foreach_mul_(masked_weights, masks)

    ours_params = [p for p in sparse.parameters()]
    _give_grads(ours_params, seed=2)
    ours = MaskedSGD(ours_params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    medians = time_interleaved({"dense": dense_step, "ours": ours.step}, device, args.repeats, warmup=args.warmup)
    dense_ms, ours_ms = medians["dense"], medians["ours"]

    stored = sum(p.numel() for p in ours_params)
    moved = sum(5 * p.numel() * p.element_size() for p in ours_params)  # r: p, g, buf; w: p, buf
    sparse_weights = sum(m.values.numel() for m in sparse.modules() if isinstance(m, SPARSE))
    sparse_dense = sum(w.numel() for w in masked_weights)
    backend = ops.select_backend("masked_sgd_", device, torch.float32)
    return dict(sparsity=sparsity, density=sparse_weights / max(sparse_dense, 1), dense_params=sum(p.numel() for p in
                dense_params), stored=stored, dense_ms=dense_ms, ours_ms=ours_ms, speedup=dense_ms / ours_ms,
                gbps=moved / (ours_ms * 1e-3) / 1e9, backend=backend, n_tensors=len(ours_params))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sparsities", default="0.5,0.9,0.95", help="comma-separated global sparsities")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default: 20 on GPU, 7 on CPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="stem + stages 1-2 only, fewer repeats")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.repeats is None:
        args.repeats = (20 if device.type == "cuda" else 7) // (2 if args.quick else 1)
    if args.threads:
        torch.set_num_threads(args.threads)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# optimizer step, ResNet-50{' (stem + stages 1-2)' if args.quick else ''}, block {args.block_size}, "
          f"{where}, SPARSEKERN_BACKEND={os.environ.get('SPARSEKERN_BACKEND', 'auto')}")
    copy_gbps = copy_bandwidth_gbps(device, 1 << 30, args.repeats) if device.type == "cuda" else None
    if copy_gbps is not None:
        print(f"# device-to-device copy: {copy_gbps:.0f} GB/s")
    header = (f"{'sparsity':>8} {'density':>8} {'dense M':>8} {'stored M':>9} {'tensors':>7} {'backend':>8} "
              f"{'dense SGD+mask ms':>17} {'ours ms':>8} {'speedup':>8}")
    if copy_gbps is not None:
        header += f" {'ours GB/s':>9} {'of copy':>8}"
    print(header)
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        r = bench_sparsity(sparsity, args, device)
        line = (f"{r['sparsity']:>8.2f} {r['density']:>8.3f} {r['dense_params'] / 1e6:>8.2f} {r['stored'] / 1e6:>9.2f} "
                f"{r['n_tensors']:>7d} {r['backend']:>8} {r['dense_ms']:>17.2f} {r['ours_ms']:>8.2f} "
                f"{r['speedup']:>7.1f}x")
        if copy_gbps is not None:
            line += f" {r['gbps']:>9.0f} {r['gbps'] / copy_gbps:>7.0%}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
