"""``python -m sparsekern.train``: dynamic sparse training of a CNN on real data.

Default: ResNet-32 on Fashion-MNIST (Debian's dataset-fashion-mnist), RigL at 90% block sparsity.
Writes DIR/log.jsonl (one line per epoch), DIR/summary.json and DIR/checkpoint.pt (every epoch; --resume DIR
continues it bit-exactly). Under torchrun it trains with DistributedDataParallel (gloo on CPU, nccl on GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern.data import DATASETS, load_dataset
from sparsekern.models import MODELS, build_model

METHODS = {"set": sk.dst.SET, "rigl": sk.dst.RigL, "bidst": sk.dst.BiDST}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sparsekern.train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="resnet32")
    p.add_argument("--data", choices=DATASETS, default="fashion-mnist")
    p.add_argument("--data-dir", default=None, help="dataset folder (default for fashion-mnist: Debian's path)")
    p.add_argument("--method", choices=["dense", *METHODS], default="rigl")
    p.add_argument("--optimizer", choices=["sgd", "sparseopt"], default="sgd")
    p.add_argument("--sparsity", type=float, default=0.9, help="global fraction of zero weights")
    p.add_argument("--block-size", type=int, default=32, choices=[16, 32, 64, 128])
    p.add_argument("--distribution", choices=["uniform", "erk"], default="erk")
    p.add_argument("--update-interval", type=int, default=100, help="steps between mask updates")
    p.add_argument("--drop-fraction", type=float, default=0.3, help="initial fraction of blocks replaced")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="cut epochs short (smoke runs)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after epoch N of the --epochs schedule (time-boxed jobs; --resume continues)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], default="off")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/train", help="output folder")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run whose checkpoint is in DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _distributed() -> tuple:
    """(rank, world size), initialising the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (torch.distributed.get_rank() if world > 1 else 0), world


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _stem_filter(module: nn.Module, name: str) -> bool:
    # The image stem (1-3 input channels) has K = kh*kw*cin <= 147: a block or two wide, so block sparsity
    # would cut whole filters; it stays dense, as in the DST literature.
    return not (isinstance(module, nn.Conv2d) and module.in_channels <= 3)


def masks_agree_across_ranks(model: nn.Module) -> bool:
    """Whether every rank holds the same block masks and values (DST must keep them identical under DDP).

    The values are compared too: DDP re-broadcasts buffers (the layout) from rank 0 on every forward, so a
    rank that had moved its blocks differently would show it only in its values.
    """
    layers = [m for m in model.modules() if isinstance(m, (sk.SparseLinear, sk.SparseConv2d))]
    if not layers or not torch.distributed.is_initialized():
        return True
    index = torch.cat([torch.cat([m.layout.coo_row, m.layout.col_idx]) for m in layers]).double()
    mine = torch.cat([index] + [m.values.detach().double().flatten() for m in layers])
    everyone = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(everyone, mine)
    return all(torch.equal(mine, other) for other in everyone)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args, autocast) -> float:
    model.eval()
    correct = 0
    with torch.no_grad(), autocast():
        for start in range(0, len(x), 512):
            xb = x[start:start + 512].to(args.device)
            if args.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            correct += (model(xb).argmax(1).cpu() == y[start:start + 512]).sum().item()
    model.train()
    return correct / len(x)


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world = _distributed()
    torch.manual_seed(args.seed)
    data = load_dataset(args.data, args.data_dir)
    model = build_model(args.model, data.num_classes, data.in_channels)
    if args.method != "dense":
        sk.sparsify(model, args.sparsity, args.block_size, args.distribution, filter_fn=_stem_filter)
    model.to(args.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer_cls = sk.optim.SparseOpt if args.optimizer == "sparseopt" else sk.optim.MaskedSGD
    optimizer = optimizer_cls(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)

    steps_per_epoch = len(data.train_x) // (args.batch_size * world)
    if args.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    total_steps = steps_per_epoch * args.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    dst = None
    if args.method != "dense":
        dst = METHODS[args.method](model, optimizer, update_interval=args.update_interval,
                                   drop_fraction=args.drop_fraction, total_steps=total_steps, seed=args.seed)
    device_type = torch.device(args.device).type
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(device_type, enabled=args.amp == "fp16")

    def autocast():
        return torch.autocast(device_type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    shuffle = torch.Generator().manual_seed(args.seed + 1)
    start_epoch, step, log = 0, 0, []
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "log.jsonl")
    if rank == 0 and not args.resume and os.path.exists(log_path):
        os.remove(log_path)  # a fresh run into a used folder must not append to the old run's log
    if args.resume:
        checkpoint = torch.load(os.path.join(args.resume, "checkpoint.pt"), weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["schedule"])
        scaler.load_state_dict(checkpoint["scaler"])
        if dst is not None:
            dst.load_state_dict(checkpoint["dst"])
        shuffle.set_state(checkpoint["shuffle"])
        _set_rng_state(checkpoint["rng"])
        start_epoch, step, log = checkpoint["epoch"], checkpoint["step"], checkpoint["log"]

    train_model = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(model)
    if args.compile:
        train_model = torch.compile(train_model)

    from tqdm import tqdm
    last_epoch = min(args.epochs, args.stop_after) if args.stop_after else args.epochs
    for epoch in range(start_epoch, last_epoch):
        order = torch.randperm(len(data.train_x), generator=shuffle)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
                   disable=args.no_progress or rank != 0, dynamic_ncols=True)
        started, seen, loss_sum, correct, train_seconds = time.perf_counter(), 0, 0.0, 0, 0.0
        for i in bar:
            batch = order[(i * world + rank) * args.batch_size:(i * world + rank + 1) * args.batch_size]
            x, y = data.train_x[batch].to(args.device), data.train_y[batch].to(args.device)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = train_model(x)
                loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            if dst is not None:
                dst.step()
            step += 1
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            elapsed = time.perf_counter() - started
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                            img_s=f"{seen * world / elapsed:.0f}")
        train_seconds = time.perf_counter() - started
        test_accuracy = evaluate(model, data.test_x, data.test_y, args, autocast)
        if not masks_agree_across_ranks(model):
            raise RuntimeError("the block masks differ between ranks: DST updates must be broadcast")
        record = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(seen, 1),
                  "train_accuracy": correct / max(seen, 1), "test_accuracy": test_accuracy,
                  "epoch_seconds": train_seconds, "images_per_second": seen * world / train_seconds,
                  "mask_update_overhead": dst.overhead() if dst is not None else 0.0}
        log.append(record)
        if rank == 0:
            print(json.dumps(record))
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
                        "dst": dst.state_dict() if dst is not None else None, "shuffle": shuffle.get_state(),
                        "rng": _rng_state(), "epoch": epoch + 1, "step": step, "log": log, "args": vars(args)},
                       os.path.join(args.out, "checkpoint.pt"))

    summary = {
        "args": vars(args),
        "test_accuracy": log[-1]["test_accuracy"] if log else None,
        "epoch_seconds": [r["epoch_seconds"] for r in log],
        "images_per_second": log[-1]["images_per_second"] if log else None,
        "mask_update_overhead": log[-1]["mask_update_overhead"] if log else None,
        "layer_densities": {name: m.density for name, m in model.named_modules()
                            if isinstance(m, (sk.SparseLinear, sk.SparseConv2d))},
        "world_size": world,
        "masks_agree_across_ranks": masks_agree_across_ranks(model),
    }
    if rank == 0:
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"test accuracy {summary['test_accuracy']:.4f}; wrote {args.out}/summary.json, log.jsonl, "
              f"checkpoint.pt")
    return summary


if __name__ == "__main__":
    main()
