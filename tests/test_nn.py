"""SparseLinear and SparseConv2d against their dense equivalents, conversions, state_dicts, training steps."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import sparsekern as sk
from conftest import block_frobenius_norms, conv_weight_from_matrix, dense_matrix, randn

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def grads(output, inputs, grad_output):
    return torch.autograd.grad(output, inputs, grad_output, materialize_grads=True)


def dense_conv_oracle(layer):
    """(nn.Conv2d with the layer's arguments, its dense weight built from the values with plain loops)."""
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                     layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode,
                     dtype=layer.values.dtype)
    weight = conv_weight_from_matrix(dense_matrix(layer.values, layer.layout), layer.out_channels,
                                     layer.in_channels // layer.groups, layer.kernel_size)
    return conv, weight


def conv_matrix(weight):
    """nn.Conv2d weight [out, cin, kh, kw] -> the [out, kh*kw*cin] matrix, K ordered (kh, kw, cin)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def expected_top_blocks(matrix, block_size, sparsity):
    norms = block_frobenius_norms(matrix.detach().double(), block_size)
    k = round((1 - sparsity) * norms.numel())
    mask = torch.zeros(norms.numel(), dtype=torch.bool)
    mask[norms.flatten().argsort(descending=True)[:k]] = True
    return mask.view(norms.shape)


# ----------------------------------------------------------------------------------------------
# SparseLinear

LINEAR_SHAPES = [(70, 37), (16, 16), (129, 33), (40, 130)]  # (in_features, out_features)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [(5,), (2, 3), (1,)])
@pytest.mark.parametrize("sparsity", [0.0, 0.6])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("in_f, out_f", LINEAR_SHAPES)
def test_linear_matches_dense(in_f, out_f, block_size, sparsity, batch, dtype):
    torch.manual_seed(in_f * out_f + block_size)
    layer = sk.SparseLinear(in_f, out_f, sparsity=sparsity, block_size=block_size, dtype=dtype)
    x = randn(*batch, in_f, seed=1, dtype=dtype, requires_grad=True)
    dy = randn(*batch, out_f, seed=2, dtype=dtype)
    weight = dense_matrix(layer.values, layer.layout)
    torch.testing.assert_close(layer.dense_weight(), weight, atol=0, rtol=0)

    y = layer(x)
    assert y.shape == (*batch, out_f) and y.dtype == dtype
    expected = F.linear(x, weight, layer.bias)
    torch.testing.assert_close(y, expected, **TOL[dtype])
    torch.testing.assert_close(layer.to_dense()(x), expected, **TOL[dtype])

    params = [x, layer.values, layer.bias]
    for got, want in zip(grads(y, params, dy), grads(expected, params, dy)):
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_linear_without_bias():
    torch.manual_seed(0)
    layer = sk.SparseLinear(70, 37, bias=False, sparsity=0.5, block_size=16)
    assert layer.bias is None
    x = randn(4, 70, seed=3)
    torch.testing.assert_close(layer(x), x @ dense_matrix(layer.values, layer.layout).t())
    assert layer.to_dense().bias is None


# ----------------------------------------------------------------------------------------------
# SparseConv2d against nn.Conv2d, one constructor argument at a time

BASE_CONV = dict(in_channels=20, out_channels=40, kernel_size=3, stride=1, padding=1, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", block_size=16, sparsity=0.5)
CONV_CASES = {
    "base": {},
    "stride2": dict(stride=2),
    "stride(1,2)": dict(stride=(1, 2)),
    "padding0": dict(padding=0),
    "padding(1,2)": dict(padding=(1, 2)),
    "same": dict(padding="same"),
    "same_even_kernel": dict(padding="same", kernel_size=(2, 4)),  # odd total padding: the extra goes right
    "same_dilated": dict(padding="same", dilation=(2, 3)),
    "valid": dict(padding="valid"),
    "dilation2": dict(dilation=2, padding=2),
    "dilation(2,1)": dict(dilation=(2, 1)),
    "groups2": dict(groups=2),
    "groups4": dict(groups=4),
    "groups4_stride2_reflect": dict(groups=4, stride=2, padding_mode="reflect"),
    "no_bias": dict(bias=False),
    "reflect": dict(padding_mode="reflect", padding=(1, 2)),
    "replicate": dict(padding_mode="replicate", padding=(1, 2)),
    "circular": dict(padding_mode="circular", padding=(1, 2)),
    "circular_same": dict(padding_mode="circular", padding="same", kernel_size=(3, 4)),
    "kernel1x1": dict(kernel_size=1, padding=0),
    "kernel(3,4)": dict(kernel_size=(3, 4), padding=(1, 2)),
    "resnet_stem": dict(in_channels=3, out_channels=32, kernel_size=7, stride=2, padding=3, bias=False),
    "block32": dict(block_size=32, sparsity=0.3),
    "channels_below_block": dict(in_channels=5, out_channels=7, block_size=32),
    "dense": dict(sparsity=0.0),
}


def make_conv(case, dtype, seed=0):
    kwargs = {**BASE_CONV, **CONV_CASES[case]}
    torch.manual_seed(seed)
    return sk.SparseConv2d(**kwargs, dtype=dtype)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("in_channels, kernel_size", [(32, 3), (20, 3), (3, 7), (24, 1)])
def test_conv_captures_dense_gradient_block_norms(in_channels, kernel_size, backend, backend_env):
    """DST update steps: grad_scores = block norms of the dense filter gradient, on whichever path the layer
    takes (on CPU: the native implicit GEMM for in_channels a multiple of the block, else im2col)."""
    backend_env(backend)
    torch.manual_seed(in_channels)
    layer = sk.SparseConv2d(in_channels, 40, kernel_size, stride=2, padding=kernel_size // 2, sparsity=0.5,
                            block_size=16)
    layer.capture_grad_scores = True
    x = randn(2, in_channels, 9, 11, seed=6)
    native = backend == "auto" and sk.ops.backend_has_op("cpu", "bsr_conv2d")
    assert layer._implicit_gemm_applies(x) == (native and in_channels % 16 == 0)
    y = layer(x)
    dy = randn(*y.shape, seed=7)
    y.backward(dy)
    dense = layer.to_dense()
    dense(x).backward(dy)
    expected = block_frobenius_norms(conv_matrix(dense.weight.grad).double(), 16)
    torch.testing.assert_close(layer.grad_scores.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # from the nn.Conv2d oracle
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_matches_dense(case, dtype):
    layer = make_conv(case, dtype)
    conv, weight = dense_conv_oracle(layer)
    height, width = (15, 13) if case == "resnet_stem" else (9, 11)
    x = randn(2, layer.in_channels, height, width, seed=4, dtype=dtype, requires_grad=True)
    torch.testing.assert_close(layer.dense_weight(), weight, atol=0, rtol=0)

    y = layer(x)
    params = {"weight": weight} if layer.bias is None else {"weight": weight, "bias": layer.bias}
    expected = functional_call(conv, params, (x,))
    assert y.shape == expected.shape and y.dtype == dtype
    torch.testing.assert_close(y, expected, **TOL[dtype])
    torch.testing.assert_close(layer.to_dense()(x), expected, **TOL[dtype])

    dy = randn(*y.shape, seed=5, dtype=dtype)
    inputs = [x, layer.values] + ([layer.bias] if layer.bias is not None else [])
    for name, got, want in zip(["x", "values", "bias"], grads(y, inputs, dy), grads(expected, inputs, dy)):
        torch.testing.assert_close(got, want, **TOL[dtype], msg=f"grad of {name}")


@pytest.mark.parametrize("case", ["base", "groups2", "same_even_kernel", "circular"])
def test_conv_unbatched_input(case):
    layer = make_conv(case, torch.float32)
    conv, weight = dense_conv_oracle(layer)
    x = randn(layer.in_channels, 9, 11, seed=6)
    y = layer(x)
    params = {"weight": weight} if layer.bias is None else {"weight": weight, "bias": layer.bias}
    expected = functional_call(conv, params, (x,))
    assert y.dim() == 3 and y.shape == expected.shape
    torch.testing.assert_close(y, expected, **TOL[torch.float32])
    torch.testing.assert_close(y, layer(x[None])[0])


# ----------------------------------------------------------------------------------------------
# from_dense / to_dense

@pytest.mark.parametrize("sparsity", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("in_f, out_f", [(70, 37), (129, 33), (40, 130)])
def test_linear_from_dense_keeps_top_norm_blocks(in_f, out_f, block_size, sparsity):
    torch.manual_seed(in_f + out_f)
    dense = nn.Linear(in_f, out_f)
    layer = sk.SparseLinear.from_dense(dense, sparsity=sparsity, block_size=block_size)
    mask = expected_top_blocks(dense.weight, block_size, sparsity)
    assert torch.equal(layer.layout.to_block_mask(), mask)
    keep = mask.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:out_f, :in_f]
    torch.testing.assert_close(layer.dense_weight(), dense.weight * keep, atol=0, rtol=0)
    torch.testing.assert_close(layer.bias, dense.bias, atol=0, rtol=0)
    assert torch.all(layer.values[layer.layout.padding_mask() == 0] == 0)


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
@pytest.mark.parametrize("case", ["base", "kernel(3,4)", "groups2", "resnet_stem"])
def test_conv_from_dense_keeps_top_norm_blocks(case, sparsity):
    kwargs = {**BASE_CONV, **CONV_CASES[case]}
    block_size = kwargs.pop("block_size")
    kwargs.pop("sparsity")
    torch.manual_seed(1)
    dense = nn.Conv2d(**kwargs)
    layer = sk.SparseConv2d.from_dense(dense, sparsity=sparsity, block_size=block_size)
    matrix = conv_matrix(dense.weight)
    mask = expected_top_blocks(matrix, block_size, sparsity)
    assert torch.equal(layer.layout.to_block_mask(), mask)
    keep = mask.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[: matrix.shape[0], : matrix.shape[1]]
    torch.testing.assert_close(conv_matrix(layer.dense_weight()), matrix * keep, atol=0, rtol=0)
    x = randn(2, dense.in_channels, 9, 11, seed=7)
    pruned = dense.to(torch.float32)
    with torch.no_grad():
        pruned.weight.copy_(layer.dense_weight())
    torch.testing.assert_close(layer(x), pruned(x), **TOL[torch.float32])


def test_from_dense_at_sparsity_zero_is_the_same_layer():
    torch.manual_seed(2)
    linear, conv = nn.Linear(70, 37), nn.Conv2d(20, 40, (3, 4), stride=2, padding=(1, 2), padding_mode="reflect")
    sparse_linear = sk.SparseLinear.from_dense(linear, sparsity=0.0, block_size=16)
    sparse_conv = sk.SparseConv2d.from_dense(conv, sparsity=0.0, block_size=16)
    assert sparse_linear.density == 1.0 and sparse_conv.density == 1.0
    torch.testing.assert_close(sparse_linear.dense_weight(), linear.weight, atol=0, rtol=0)
    torch.testing.assert_close(sparse_conv.dense_weight(), conv.weight, atol=0, rtol=0)
    x = randn(3, 70, seed=8)
    image = randn(2, 20, 9, 11, seed=9)
    torch.testing.assert_close(sparse_linear(x), linear(x))
    torch.testing.assert_close(sparse_conv(image), conv(image))


@pytest.mark.parametrize("layer_kind", ["linear", "conv"])
def test_to_dense_round_trip(layer_kind):
    torch.manual_seed(3)
    if layer_kind == "linear":
        layer = sk.SparseLinear(70, 37, sparsity=0.6, block_size=16)
        back = sk.SparseLinear.from_dense(layer.to_dense(), sparsity=1 - layer.density, block_size=16)
    else:
        layer = make_conv("kernel(3,4)", torch.float32)
        back = sk.SparseConv2d.from_dense(layer.to_dense(), sparsity=1 - layer.density, block_size=16)
    dense = layer.to_dense()
    assert isinstance(dense, nn.Linear if layer_kind == "linear" else nn.Conv2d)
    torch.testing.assert_close(dense.weight, layer.dense_weight(), atol=0, rtol=0)
    assert torch.equal(back.layout.to_block_mask(), layer.layout.to_block_mask())
    torch.testing.assert_close(back.values, layer.values, atol=0, rtol=0)
    torch.testing.assert_close(back.bias, layer.bias, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# state_dict

def test_sparse_layer_loads_dense_state_dict():
    torch.manual_seed(4)
    dense = nn.Linear(70, 37)
    layer = sk.SparseLinear(70, 37, sparsity=0.6, block_size=16)
    layer.load_state_dict(dense.state_dict())
    mask = expected_top_blocks(dense.weight, 16, 0.6)
    assert torch.equal(layer.layout.to_block_mask(), mask)
    reference = sk.SparseLinear.from_dense(dense, sparsity=0.6, block_size=16)
    torch.testing.assert_close(layer.values, reference.values, atol=0, rtol=0)
    torch.testing.assert_close(layer.bias, dense.bias, atol=0, rtol=0)


@pytest.mark.parametrize("layer_kind", ["linear", "conv"])
def test_sparse_dense_sparse_via_state_dict(layer_kind):
    torch.manual_seed(5)
    layer = sk.SparseLinear(70, 37, sparsity=0.6, block_size=16) if layer_kind == "linear" else \
        make_conv("resnet_stem", torch.float32)
    # every stored block is non-zero, so the top-norm blocks of the dense weight are exactly the stored ones
    assert torch.all(layer.values.detach().flatten(1).norm(dim=1) > 0)
    mask, values, bias = layer.layout.to_block_mask(), layer.values.detach().clone(), layer.bias
    index = [t.clone() for t in layer.layout.index_tensors()]
    layer.load_state_dict(layer.to_dense().state_dict())
    assert torch.equal(layer.layout.to_block_mask(), mask)
    for before, after in zip(index, layer.layout.index_tensors()):
        assert torch.equal(before, after)
    torch.testing.assert_close(layer.values, values, atol=0, rtol=0)
    if bias is not None:
        torch.testing.assert_close(layer.bias, bias, atol=0, rtol=0)


@pytest.mark.parametrize("layer_kind", ["linear", "conv"])
def test_sparse_state_dict_into_another_sparse_layer(layer_kind):
    def make(seed):
        torch.manual_seed(seed)
        if layer_kind == "linear":
            return sk.SparseLinear(70, 37, sparsity=0.6, block_size=16)
        return sk.SparseConv2d(20, 40, 3, padding=1, sparsity=0.6, block_size=16)

    source, target = make(6), make(7)
    assert not torch.equal(source.layout.to_block_mask(), target.layout.to_block_mask())
    assert source.layout.nnz_blocks == target.layout.nnz_blocks
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.layout.to_block_mask(), source.layout.to_block_mask())
    for a, b in zip(target.layout.index_tensors(), source.layout.index_tensors()):
        assert torch.equal(a, b)
    torch.testing.assert_close(target.values, source.values, atol=0, rtol=0)
    torch.testing.assert_close(target.bias, source.bias, atol=0, rtol=0)
    x = randn(3, 70, seed=10) if layer_kind == "linear" else randn(2, 20, 9, 11, seed=10)
    torch.testing.assert_close(target(x), source(x), atol=0, rtol=0)


def test_dense_weight_of_wrong_shape_raises():
    torch.manual_seed(8)
    model = nn.Sequential(sk.SparseLinear(70, 37, sparsity=0.5, block_size=16))
    state = {"0.weight": torch.randn(37, 71), "0.bias": torch.randn(37)}
    with pytest.raises(RuntimeError, match=r"0\.weight"):
        model.load_state_dict(state)
    conv = nn.Sequential(sk.SparseConv2d(20, 40, 3, sparsity=0.5, block_size=16))
    with pytest.raises(RuntimeError, match=r"0\.weight"):
        conv.load_state_dict({"0.weight": torch.randn(40, 20, 3, 4), "0.bias": torch.randn(40)})


# ----------------------------------------------------------------------------------------------
# Padding stays zero through training

@pytest.mark.parametrize("layer_kind", ["linear", "conv"])
def test_padding_values_stay_zero_through_sgd(layer_kind):
    torch.manual_seed(9)
    if layer_kind == "linear":
        layer, x = sk.SparseLinear(70, 37, sparsity=0.0, block_size=16), randn(6, 70, seed=11)
    else:
        layer, x = sk.SparseConv2d(20, 40, 3, padding=1, sparsity=0.0, block_size=16), randn(2, 20, 9, 11, seed=11)
    padding = layer.layout.padding_mask() == 0
    assert padding.any()  # 70 = 4*16 + 6 and 37 = 2*16 + 5 (conv: K = 180 = 11*16 + 4, 40 = 2*16 + 8)
    assert torch.all(layer.values[padding] == 0)
    inside_before = layer.values.detach()[~padding].clone()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        layer(x).square().mean().backward()
        optimizer.step()
    assert torch.all(layer.values[padding] == 0)
    assert not torch.equal(layer.values.detach()[~padding], inside_before)


# ----------------------------------------------------------------------------------------------
# Errors

@pytest.mark.parametrize("kwargs", [dict(sparsity=1.0), dict(sparsity=-0.1), dict(sparsity=1.5), dict(block_size=8),
                                    dict(block_size=48)], ids=str)
def test_linear_constructor_errors(kwargs):
    with pytest.raises(ValueError, match="sparsity|block_size"):
        sk.SparseLinear(64, 64, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity=-0.1), "sparsity"),
    (dict(block_size=8), "block_size"),
    (dict(groups=3), "groups"),
    (dict(in_channels=20, out_channels=30, groups=4), "groups"),
    (dict(padding="same", stride=2), "same"),
    (dict(padding="full"), "padding"),
    (dict(padding_mode="bogus"), "padding_mode"),
], ids=str)
def test_conv_constructor_errors(kwargs, match):
    args = {**dict(in_channels=20, out_channels=40, kernel_size=3), **kwargs}
    with pytest.raises(ValueError, match=match):
        sk.SparseConv2d(**args)


def test_wrong_input_channels():
    torch.manual_seed(10)
    with pytest.raises(ValueError, match="70"):
        sk.SparseLinear(70, 37, sparsity=0.5, block_size=16)(randn(4, 71, seed=0))
    conv = sk.SparseConv2d(20, 40, 3, sparsity=0.5, block_size=16)
    with pytest.raises(ValueError, match="20"):
        conv(randn(2, 21, 9, 11, seed=0))
    with pytest.raises(ValueError, match="20"):
        conv(randn(2, 20, 9, seed=0))


# ----------------------------------------------------------------------------------------------
# Module plumbing

def test_to_float64():
    torch.manual_seed(11)
    linear = sk.SparseLinear(70, 37, sparsity=0.5, block_size=16).to(torch.float64)
    conv = make_conv("base", torch.float32).to(torch.float64)
    for layer in (linear, conv):
        assert layer.values.dtype == torch.float64 and layer.bias.dtype == torch.float64
        assert all(t.dtype == torch.int32 for t in layer.layout.index_tensors())
    x = randn(4, 70, seed=12, dtype=torch.float64)
    torch.testing.assert_close(linear(x), F.linear(x, dense_matrix(linear.values, linear.layout), linear.bias),
                               **TOL[torch.float64])
    image = randn(2, 20, 9, 11, seed=13, dtype=torch.float64)
    dense, weight = dense_conv_oracle(conv)
    expected = functional_call(dense, {"weight": weight, "bias": conv.bias}, (image,))
    torch.testing.assert_close(conv(image), expected, **TOL[torch.float64])


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count(bias):
    torch.manual_seed(12)
    for layer, out in ((sk.SparseLinear(70, 37, bias=bias, sparsity=0.6, block_size=16), 37),
                       (sk.SparseConv2d(20, 40, 3, bias=bias, sparsity=0.8, block_size=32), 40)):
        bs = layer.block_size
        expected = layer.layout.nnz_blocks * bs * bs + (out if bias else 0)
        assert sum(p.numel() for p in layer.parameters()) == expected
        assert {name for name, _ in layer.named_parameters()} == ({"values", "bias"} if bias else {"values"})


def test_layer_density_follows_sparsity():
    torch.manual_seed(13)
    layer = sk.SparseLinear(70, 37, sparsity=0.6, block_size=16)  # 3 x 5 = 15 blocks
    assert layer.layout.nnz_blocks == round(0.4 * 15)
    assert layer.density == pytest.approx(6 / 15)
    conv = sk.SparseConv2d(20, 40, 3, sparsity=0.75, block_size=16)  # 3 x ceil(180/16)=12 -> 36 blocks
    assert conv.layout.nnz_blocks == 9 and conv.layout.shape == (40, 180)
