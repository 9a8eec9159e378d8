"""torch.compile(fullgraph=True) with the inductor backend: sparse layers and in-place layout updates.

Each test compiles once (a few seconds on 2 CPU cores), so shapes stay small.
"""
import copy

import pytest
import torch
from torch import nn

import sparsekern as sk
from conftest import dense_matrix, generator, randn, random_layout, random_values


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = sk.SparseConv2d(5, 24, 3, padding=1, sparsity=0.5, block_size=16)
        self.head = sk.SparseLinear(24, 10, sparsity=0.4, block_size=16)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_compiled_model_matches_eager():
    torch.manual_seed(0)
    model = SmallNet()
    x = randn(3, 5, 7, 9, seed=1, requires_grad=True)
    dy = randn(3, 10, seed=2)
    params = [x] + list(model.parameters())
    assert len(params) == 5  # x, conv values + bias, head values + bias

    y_eager = model(x)
    grads_eager = torch.autograd.grad(y_eager, params, dy)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    y_compiled = compiled(x)
    grads_compiled = torch.autograd.grad(y_compiled, params, dy)

    torch.testing.assert_close(y_compiled, y_eager, atol=1e-5, rtol=1e-5)
    for i, (got, want) in enumerate(zip(grads_compiled, grads_eager)):
        assert torch.count_nonzero(want) > 0, i
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"grad {i}")


def masks_like(layout, seeds):
    """New block masks with the layout's block count (random permutations of its current mask)."""
    grid_size = layout.block_grid[0] * layout.block_grid[1]
    current = layout.to_block_mask().flatten()
    return [current[torch.randperm(grid_size, generator=generator(seed))].view(layout.block_grid) for seed in seeds]


def compiled_update_step(layout):
    def step(block_mask, x, values):
        layout.update_(block_mask, check=False)
        return sk.ops.bsr_linear(x, layout, values)

    return torch.compile(step, fullgraph=True, backend="inductor")


def test_compiled_layout_update_then_bsr_linear():
    shape, block_size = (40, 70), 16
    layout = random_layout(shape, block_size, 0.5, seed=3)
    values = random_values(layout, seed=4)
    x = randn(6, 70, seed=5)
    compiled = compiled_update_step(layout)
    for mask in masks_like(layout, seeds=(6, 7, 8)):
        y = compiled(mask, x, values)
        assert torch.equal(layout.to_block_mask(), mask)
        expected_layout = sk.BlockSparseLayout.from_block_mask(mask, block_size, shape)
        for got, want in zip(layout.index_tensors(), expected_layout.index_tensors()):
            assert torch.equal(got, want)
        torch.testing.assert_close(y, x @ dense_matrix(values, expected_layout).t(), atol=1e-5, rtol=1e-5)


def test_layout_update_does_not_recompile_the_model():
    """DST rewrites masks (eagerly, between steps) every few hundred steps: the compiled model must not be
    retraced for each new mask, since the layout changes in place with the same shapes."""
    torch.manual_seed(14)
    model = SmallNet()
    x = randn(3, 5, 7, 9, seed=15)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    compiled(x)
    for mask in masks_like(model.head.layout, seeds=(16, 17)):
        model.head.layout.update_(mask, block_tensors=[model.head.values.data])
        with torch._dynamo.config.patch(error_on_recompile=True):
            y = compiled(x)
        torch.testing.assert_close(y, model(x), atol=1e-5, rtol=1e-5)
        assert torch.equal(model.head.layout.to_block_mask(), mask)


def test_a_whole_training_step_compiles_and_survives_mask_updates():
    """What CUDA-graph capture of a training step needs, checked on the CPU: the model (forward, and its backward
    through AOTAutograd) and the fused optimizer step each compile as one graph (fullgraph), layout updates between
    steps cause no recompile, and the parameters follow the eager run's step for step."""
    torch.manual_seed(21)
    model = SmallNet()
    eager = copy.deepcopy(model)
    opts = [sk.optim.MaskedSGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, eager)]
    compiled_model = torch.compile(model, fullgraph=True, backend="inductor")
    compiled_step = torch.compile(opts[0].step, fullgraph=True, backend="inductor")
    x = randn(3, 5, 7, 9, seed=22)

    def train(net, step, opt):
        opt.zero_grad()
        net(x).square().mean().backward()
        step()

    for _ in range(2):  # the optimizer's state appears at its first step: one recompile, once
        train(compiled_model, compiled_step, opts[0])
        train(eager, opts[1].step, opts[1])
    for mask in masks_like(model.head.layout, seeds=(23, 24)):
        for m, opt in ((model, opts[0]), (eager, opts[1])):
            buffer = opt.state[m.head.values]["momentum_buffer"]
            m.head.layout.update_(mask, block_tensors=[m.head.values.data, buffer])
        with torch._dynamo.config.patch(error_on_recompile=True):
            train(compiled_model, compiled_step, opts[0])
        train(eager, opts[1].step, opts[1])
        for got, want in zip(model.parameters(), eager.parameters()):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
