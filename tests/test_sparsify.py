"""sk.sparsify and sk.nn.layer_densities on a small ResNet-style model."""
import copy
import math

import pytest
import torch
from torch import nn

import sparsekern as sk
from conftest import randn

SPARSE_TYPES = (sk.SparseLinear, sk.SparseConv2d)


class BasicBlock(nn.Module):
    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                        nn.BatchNorm2d(out_channels))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.downsample(x))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = BasicBlock(16, 32, 2)
        self.layer2 = BasicBlock(32, 64, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.pool(self.layer2(self.layer1(self.stem(x)))).flatten(1))


def make_model(seed=0):
    torch.manual_seed(seed)
    return TinyResNet()


def eligible_layers(model):
    return {name: m for name, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}


def weight_matrix_shape(module):
    """[N, K] of the weight as a matrix (Conv2d: K = kh * kw * in/groups)."""
    return module.weight.shape[0], module.weight[0].numel()


def kept_weights(module):
    """Weights a layer stores: density * dense numel for a sparse layer, all of them for a dense one."""
    if isinstance(module, SPARSE_TYPES):
        return module.density * math.prod(module.dense_weight_shape)
    return module.weight.numel()


def rounding_tolerance(layers, densities, block_size):
    """Largest global-sparsity error that rounding each layer to whole blocks can cause.

    A layer with g blocks asked for density d keeps round(d * g) blocks (at least one): it is off by at
    most half a block, or by 1 - d*g blocks when d*g < 1/2 rounds to 0 and is lifted to 1. A block is
    n / g of the layer's n weights.
    """
    total = sum(m.weight.numel() for m in layers)
    error = 0.0
    for module, density in zip(layers, densities):
        n, k = weight_matrix_shape(module)
        blocks = math.ceil(n / block_size) * math.ceil(k / block_size)
        error += max(0.5, 1.0 - density * blocks) * module.weight.numel() / blocks
    return error / total


# ----------------------------------------------------------------------------------------------
# Global sparsity

@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9])
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_global_sparsity(distribution, sparsity):
    model = make_model()
    before = eligible_layers(model)
    densities = sk.nn.layer_densities(list(before.values()), sparsity, distribution)
    tolerance = rounding_tolerance(list(before.values()), densities, 16)
    assert tolerance < 0.05  # the bound itself must be tight enough to mean something

    returned = sk.sparsify(model, sparsity=sparsity, block_size=16, distribution=distribution)
    assert returned is model
    after = {name: model.get_submodule(name) for name in before}
    assert any(isinstance(m, SPARSE_TYPES) for m in after.values())
    total = sum(m.weight.numel() for m in before.values())
    measured = 1.0 - sum(kept_weights(m) for m in after.values()) / total
    assert abs(measured - sparsity) <= tolerance + 1e-12, (measured, sparsity, tolerance)
    for name, module in after.items():
        assert type(module) in (nn.Linear, nn.Conv2d, *SPARSE_TYPES), name
        if isinstance(module, SPARSE_TYPES):
            assert module.block_size == 16
            assert isinstance(module, sk.SparseLinear) == isinstance(before[name], nn.Linear)


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_sparsified_model_runs_and_keeps_weights(distribution):
    model = make_model(1)
    original = copy.deepcopy(model)
    sk.sparsify(model, sparsity=0.8, block_size=16, distribution=distribution)
    swapped = {name: m for name, m in model.named_modules() if isinstance(m, SPARSE_TYPES)}
    assert swapped
    for name, layer in swapped.items():
        # kept entries are the original weights; the rest are zero
        dense = original.get_submodule(name).weight.detach()
        kept = layer.dense_weight().detach()
        assert torch.equal(kept, torch.where(kept != 0, dense, torch.zeros_like(dense))), name
        assert (kept != 0).any(), name
    # non-swapped parameters (BatchNorm, dense layers) are untouched
    original_params = dict(original.named_parameters())
    for name, param in model.named_parameters():
        if name in original_params:
            assert torch.equal(param, original_params[name]), name

    x = randn(2, 3, 16, 16, seed=2)
    y = model(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    y.square().mean().backward()
    for name, layer in swapped.items():
        assert layer.values.grad is not None and torch.isfinite(layer.values.grad).all(), name
        assert layer.values.grad.abs().sum() > 0, name


def test_filter_fn_keeps_layers_dense():
    model = make_model(2)
    seen = []

    def keep_fc_dense(module, name):
        seen.append(name)
        return not name.startswith("fc")

    sk.sparsify(model, sparsity=0.9, block_size=16, distribution="uniform", filter_fn=keep_fc_dense)
    assert type(model.fc) is nn.Linear
    assert set(seen) == set(eligible_layers(make_model(2)))
    # every other layer with more than one block is swapped at 90% uniform
    for name in ("layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2", "layer2.downsample.0"):
        assert isinstance(model.get_submodule(name), sk.SparseConv2d), name


# ----------------------------------------------------------------------------------------------
# ERK

def erk_score(module):
    return sum(module.weight.shape) / module.weight.numel()


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9])
def test_erk_favours_small_layers(sparsity):
    model = make_model(3)
    before = eligible_layers(model)
    densities = dict(zip(before, sk.nn.layer_densities(list(before.values()), sparsity, "erk")))
    names = list(before)
    for a in names:
        for b in names:
            if erk_score(before[a]) > erk_score(before[b]):
                assert densities[a] >= densities[b], (a, b)
    # the biggest layer is the sparsest, and strictly sparser than the smallest 3x3 conv
    assert densities["layer2.conv2"] == min(densities.values())
    assert densities["layer2.conv2"] < densities["layer1.conv1"]

    sk.sparsify(model, sparsity=sparsity, block_size=16, distribution="erk")
    big, small = model.layer2.conv2, model.layer1.conv1
    assert isinstance(big, sk.SparseConv2d)
    small_density = small.density if isinstance(small, SPARSE_TYPES) else 1.0
    assert small_density > big.density
    # ERK caps at 1: those layers stay plain torch layers
    for name, density in densities.items():
        if density == 1.0:
            assert type(model.get_submodule(name)) in (nn.Linear, nn.Conv2d), name


def test_erk_caps_some_layers_at_half_sparsity():
    model = make_model(4)
    before = eligible_layers(model)
    densities = dict(zip(before, sk.nn.layer_densities(list(before.values()), 0.5, "erk")))
    capped = {name for name, d in densities.items() if d == 1.0}
    # fc (10x64) and the 1x1 downsample convs have the highest ERK scores: they saturate first
    assert "fc" in capped and "layer1.downsample.0" in capped
    sk.sparsify(model, sparsity=0.5, block_size=16, distribution="erk")
    for name in capped:
        assert type(model.get_submodule(name)) is type(before[name]), name


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.8, 0.9, 0.99])
def test_erk_densities_meet_the_budget(sparsity):
    layers = list(eligible_layers(make_model(5)).values())
    # add extreme shapes: a tiny layer that must saturate and a large one
    layers += [nn.Linear(4, 3), nn.Conv2d(64, 128, 3), nn.Conv2d(8, 8, 5, groups=2)]
    densities = sk.nn.layer_densities(layers, sparsity, "erk")
    sizes = [m.weight.numel() for m in layers]
    kept = sum(d * n for d, n in zip(densities, sizes))
    assert abs(kept - (1 - sparsity) * sum(sizes)) <= 1e-9 * sum(sizes)
    assert all(0 < d <= 1.0 for d in densities)
    if sparsity < 0.9:
        assert 1.0 in densities  # the 4 -> 3 linear saturates


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_uniform_densities(sparsity):
    layers = list(eligible_layers(make_model(6)).values())
    assert sk.nn.layer_densities(layers, sparsity, "uniform") == [1.0 - sparsity] * len(layers)


def test_bad_distribution_raises():
    model = make_model(7)
    with pytest.raises(ValueError, match="distribution"):
        sk.nn.layer_densities(list(eligible_layers(model).values()), 0.9, "lognormal")
    with pytest.raises(ValueError, match="distribution"):
        sk.sparsify(model, sparsity=0.9, block_size=16, distribution="ERK-ish")
    assert not any(isinstance(m, SPARSE_TYPES) for m in model.modules())


@pytest.mark.parametrize("sparsity", [1.0, -0.1])
def test_bad_sparsity_raises(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        sk.sparsify(make_model(8), sparsity=sparsity, block_size=16)
