"""Whole training steps of a model with sparse layers replay as CUDA graphs, with DST mask updates between replays.

The layout has a fixed capacity and every op runs on the current stream without host syncs, so a captured step
(forward, backward, the fused optimizer step) stays valid when a mask update rewrites the index in place between
replays: no re-capture. Each test trains a captured model and an eager twin on the same batches and compares the
parameters after every step. GPU only (the CPU half, torch.compile fullgraph with mask updates, is in
tests/test_compile.py).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BATCH, CLASSES = 16, 10
TOL = dict(rtol=1e-4, atol=1e-5)  # graph and eager run the same kernels; split-M reductions may reorder sums


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        sk.SparseConv2d(16, 32, 3, padding=1, sparsity=0.75, block_size=16), nn.ReLU(),
        sk.SparseConv2d(32, 32, 3, stride=2, padding=1, sparsity=0.75, block_size=16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        sk.SparseLinear(32, 64, sparsity=0.5, block_size=16), nn.ReLU(),
        nn.Linear(64, CLASSES)).cuda()


def batches(n, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [(torch.randn(BATCH, 16, 12, 12, device="cuda", generator=g),
             torch.randint(0, CLASSES, (BATCH,), device="cuda", generator=g)) for _ in range(n)]


def sparse_layers(model):
    return [m for m in model if isinstance(m, (sk.SparseLinear, sk.SparseConv2d))]


def new_masks(model, seed):
    """A new block mask per sparse layer, with its layer's block count (a permutation of the current mask)."""
    g = torch.Generator().manual_seed(seed)
    masks = []
    for layer in sparse_layers(model):
        current = layer.layout.to_block_mask().flatten().cpu()
        masks.append(current[torch.randperm(current.numel(), generator=g)].view(layer.layout.block_grid).cuda())
    return masks


def update_masks(model, optimizer, masks):
    """DST's move, in place and on the device: the layout, the values and their optimizer state follow the mask."""
    for layer, mask in zip(sparse_layers(model), masks):
        layer.layout.update_(mask, check=False, block_tensors=[layer.values.data, *optimizer.block_state(layer.values)])


def eager_step(model, optimizer, x, y):
    optimizer.zero_grad(set_to_none=False)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def assert_same_parameters(a, b, step):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **TOL, msg=lambda m: f"step {step}, {name}: {m}")


def model_and_twin(seed):
    """A model and its eager twin, each with its own MaskedSGD."""
    model = small_net(seed)
    twin = copy.deepcopy(model)
    return model, twin, *(sk.optim.MaskedSGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, twin))


def warm_up(model, optimizer, data, steps=3):
    """Eager steps on a side stream before capture: Triton compiles and autotunes, auto measures each shape, the
    optimizer creates its state (none of which may happen inside a capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for x, y in data[:steps]:
            eager_step(model, optimizer, x, y)
    torch.cuda.current_stream().wait_stream(stream)


@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
def test_a_captured_training_step_replays_across_mask_updates(backend, backend_env):
    backend_env(backend)
    if backend != "auto" and sk.ops.backend_unavailable_reason(backend, "cuda") is not None:
        pytest.skip(sk.ops.backend_unavailable_reason(backend, "cuda"))
    model, twin, opt, twin_opt = model_and_twin(seed=0)
    data = batches(9, seed=1)
    warm_up(model, opt, data)
    for x, y in data[:3]:
        eager_step(twin, twin_opt, x, y)
    assert_same_parameters(model, twin, "warm-up")

    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        F.cross_entropy(model(static_x), static_y).backward()
        opt.step()
    for step, (x, y) in enumerate(data[3:], start=3):
        if step in (5, 7):  # DST moves blocks between replays: same capacity, rewritten in place
            masks = new_masks(model, seed=step)
            update_masks(model, opt, masks)
            update_masks(twin, twin_opt, masks)
        static_x.copy_(x)
        static_y.copy_(y)
        opt.zero_grad(set_to_none=False)  # grads are accumulated into by the graph's backward: zero them outside
        graph.replay()
        eager_step(twin, twin_opt, x, y)
        assert_same_parameters(model, twin, step)
    for layer, twin_layer in zip(sparse_layers(model), sparse_layers(twin)):
        assert torch.equal(layer.layout.to_block_mask(), twin_layer.layout.to_block_mask())


def train_beside_twin(run, model, twin, opt, twin_opt, data, first_step, update_at):
    """Train ``run`` (the model, graphed or compiled) and the eager twin on the same batches, moving the same
    blocks of both at the steps ``update_at``; parameters compared after every step."""
    for step, (x, y) in enumerate(data[first_step:], start=first_step):
        if step in update_at:
            masks = new_masks(model, seed=step)
            update_masks(model, opt, masks)
            update_masks(twin, twin_opt, masks)
        eager_step(run, opt, x, y)
        eager_step(twin, twin_opt, x, y)
        assert_same_parameters(model, twin, step)


def test_make_graphed_callables_trains_across_mask_updates():
    model, twin, opt, twin_opt = model_and_twin(seed=2)
    data = batches(8, seed=3)
    warm_up(model, opt, data, steps=2)
    for x, y in data[:2]:
        eager_step(twin, twin_opt, x, y)
    graphed = torch.cuda.make_graphed_callables(model, (data[0][0].clone(),))
    train_beside_twin(graphed, model, twin, opt, twin_opt, data, first_step=2, update_at=(5,))


def test_reduce_overhead_compile_trains_across_mask_updates():
    torch.compiler.reset()
    model, twin, opt, twin_opt = model_and_twin(seed=4)
    compiled = torch.compile(model, mode="reduce-overhead")
    train_beside_twin(compiled, model, twin, opt, twin_opt, batches(8, seed=5), first_step=0, update_at=(4, 6))
    torch.compiler.reset()
