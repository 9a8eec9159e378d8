"""Plain-PyTorch definitions of every sparsekern op: the meaning of correctness.

Each op is computed on the dense matrix that the compact block values stand for. Nothing here
synchronises with the host (no boolean indexing, no ``nonzero()``, no ``.item()``), so the
reference also runs under CUDA graphs and ``torch.compile``.

Layout tensors (all int32, see ``sparsekern.layout``): ``row_ptr`` [R+1], ``col_idx`` [nnz],
``coo_row`` [nnz] (block-row of each stored block, CSR order), ``col_ptr`` [C+1], ``row_idx`` [nnz]
and ``perm`` [nnz] (the transposed index: CSC order, ``perm`` points into the values).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def blocks_to_dense(values: Tensor, coo_row: Tensor, col_idx: Tensor, n_block_rows: int, n_block_cols: int) -> Tensor:
    """Compact blocks [nnz, bs, bs] -> the padded dense matrix [R*bs, C*bs] (differentiable in ``values``)."""
    bs = values.shape[-1]
    grid = values.new_zeros(n_block_rows, n_block_cols, bs, bs)
    grid = grid.index_put((coo_row.long(), col_idx.long()), values)
    return grid.permute(0, 2, 1, 3).reshape(n_block_rows * bs, n_block_cols * bs)


def pad_to_blocks(matrix: Tensor, block_size: int) -> Tensor:
    """Zero-pad a 2-D matrix on the bottom/right up to multiples of ``block_size``."""
    rows, cols = matrix.shape
    pad_rows = _cdiv(rows, block_size) * block_size - rows
    pad_cols = _cdiv(cols, block_size) * block_size - cols
    return torch.nn.functional.pad(matrix, (0, pad_cols, 0, pad_rows))


def dense_to_blocks(matrix: Tensor, coo_row: Tensor, col_idx: Tensor, block_size: int) -> Tensor:
    """Gather the blocks (coo_row[i], col_idx[i]) of a dense matrix into [nnz, bs, bs]."""
    padded = pad_to_blocks(matrix, block_size)
    grid = padded.reshape(padded.shape[0] // block_size, block_size, padded.shape[1] // block_size, block_size)
    return grid[coo_row.long(), :, col_idx.long(), :]


def block_norms(matrix: Tensor, block_size: int) -> Tensor:
    """Frobenius norm of every bs x bs block of a (zero-padded) dense matrix: [R, C]."""
    padded = pad_to_blocks(matrix, block_size)
    grid = padded.reshape(padded.shape[0] // block_size, block_size, padded.shape[1] // block_size, block_size)
    return grid.pow(2).sum(dim=(1, 3)).sqrt()


def _dense_weight(values: Tensor, coo_row: Tensor, col_idx: Tensor, row_ptr: Tensor, col_ptr: Tensor,
                  n_rows: int, n_cols: int) -> Tensor:
    dense = blocks_to_dense(values, coo_row, col_idx, row_ptr.numel() - 1, col_ptr.numel() - 1)
    return dense[:n_rows, :n_cols]


def bsr_linear(x, values, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm, out_features, bias):
    """Y = X Wᵀ (+ b) with W [out_features, in_features] block-sparse."""
    w = _dense_weight(values, coo_row, col_idx, row_ptr, col_ptr, out_features, x.shape[1])
    return torch.nn.functional.linear(x, w, bias)  # bias added before the output is rounded


def bsr_linear_dx(dy, values, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm, in_features):
    """dX = dY W."""
    w = _dense_weight(values, coo_row, col_idx, row_ptr, col_ptr, dy.shape[1], in_features)
    return dy @ w


def bsr_sddmm(dy, x, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm, block_size):
    """dW blocks = (dYᵀ X) sampled at the layout's blocks: [nnz, bs, bs]."""
    return dense_to_blocks(dy.t() @ x, coo_row, col_idx, block_size)


def block_grad_scores(dy, x, block_size):
    """Frobenius norm of every block of the dense dYᵀX: [ceil(N/bs), ceil(K/bs)], fp32 (fp64 for fp64 inputs)."""
    acc = _accumulate_dtype(dy.dtype)
    return block_norms(dy.to(acc).t() @ x.to(acc), block_size)


def build_layout_index_(block_mask, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm):
    """Fill block-CSR (row-major order) and block-CSC (column-major, ``perm`` -> CSR position) from a mask.

    Entries that would land at or past the capacity are dropped (the caller checks the count), so
    a wrong mask never writes out of bounds.
    """
    capacity = col_idx.numel()
    n_rows, n_cols = block_mask.shape
    ones = block_mask.to(torch.int32)
    rows = torch.arange(n_rows, dtype=torch.int32, device=block_mask.device)[:, None].expand(n_rows, n_cols)
    cols = torch.arange(n_cols, dtype=torch.int32, device=block_mask.device)[None, :].expand(n_rows, n_cols)

    row_ptr[0] = 0
    torch.cumsum(ones.sum(1, dtype=torch.int32), 0, dtype=torch.int32, out=row_ptr[1:])
    col_ptr[0] = 0
    torch.cumsum(ones.sum(0, dtype=torch.int32), 0, dtype=torch.int32, out=col_ptr[1:])
    csr_pos = row_ptr[:-1, None] + ones.cumsum(1, dtype=torch.int32) - 1
    csc_pos = col_ptr[None, :-1] + ones.cumsum(0, dtype=torch.int32) - 1

    def scatter(target: Tensor, positions: Tensor, source: Tensor) -> None:
        # Unset blocks (and any overflow) go to a spare slot past the end, then are cut off.
        slot = torch.where(block_mask & (positions < capacity), positions, capacity).long().flatten()
        spare = target.new_empty(capacity + 1)
        spare.scatter_(0, slot, source.flatten())
        target.copy_(spare[:capacity])

    scatter(col_idx, csr_pos, cols)
    scatter(coo_row, csr_pos, rows)
    scatter(row_idx, csc_pos, rows)
    scatter(perm, csc_pos, csr_pos)


def masked_sgd_(param, grad, momentum_buffer, master, step, grad_scale, inv_loss_scale, found_inf,
                lr, momentum, dampening, weight_decay, nesterov, decoupled_weight_decay):
    """One SGD step on compact values, in place, in the order torch.optim.SGD computes it.

    ``master``: fp32 copy updated instead of a low-precision ``param`` (which receives its rounding);
    ``grad_scale``: per-block gradient factors [nnz] (SparseOpt), ``inv_loss_scale``: 1/AMP scale;
    ``found_inf`` != 0 skips the step, momentum included; ``step`` counts taken steps (the first one
    initialises the momentum buffer with the gradient, as torch does).
    """
    weights = master if master is not None else param
    g = grad.to(weights.dtype)
    if inv_loss_scale is not None:
        g = g * inv_loss_scale.to(weights.dtype)
    if grad_scale is not None:
        g = g * grad_scale.to(weights.dtype).view(-1, *([1] * (g.dim() - 1)))
    if weight_decay != 0 and not decoupled_weight_decay:
        g = g.add(weights, alpha=weight_decay)
    new_buffer = None
    if momentum != 0:
        running = momentum_buffer.mul(momentum).add(g, alpha=1 - dampening)
        new_buffer = torch.where(step == 0, g, running)
        g = g.add(new_buffer, alpha=momentum) if nesterov else new_buffer
    new_weights = weights.mul(1 - lr * weight_decay) if decoupled_weight_decay and weight_decay != 0 else weights
    new_weights = new_weights.add(g, alpha=-lr)
    take = torch.ones((), dtype=torch.bool, device=weights.device) if found_inf is None else found_inf == 0
    weights.copy_(torch.where(take, new_weights, weights))
    if new_buffer is not None:
        momentum_buffer.copy_(torch.where(take, new_buffer, momentum_buffer))
    if master is not None:
        param.copy_(weights)
    step.add_(take.to(step.dtype))


# ----------------------------------------------------------------------------------------------
# Convolution with a block-sparse filter (groups = 1) on NHWC images. The filter matrix [N, K] has K
# ordered (kh, kw, cin); ``padding`` is (top, left) and the output size fixes the bottom/right padding.

def _conv_padding(input_size, kernel_size, stride, padding, dilation, output_size):
    """(left, right, top, bottom) padding (negative: cropping) that makes the output exactly output_size."""
    height = (output_size[0] - 1) * stride[0] + dilation[0] * (kernel_size[0] - 1) + 1
    width = (output_size[1] - 1) * stride[1] + dilation[1] * (kernel_size[1] - 1) + 1
    top, left = padding
    return left, width - input_size[1] - left, top, height - input_size[0] - top


def unfold_nhwc(x, kernel_size, stride, padding, dilation, output_size):
    """im2col of an NHWC image: [B*OH*OW, kh*kw*C] with K ordered (kh, kw, cin)."""
    left, right, top, bottom = _conv_padding(x.shape[1:3], kernel_size, stride, padding, dilation, output_size)
    image = torch.nn.functional.pad(x, (0, 0, left, right, top, bottom))
    (out_h, out_w), (sh, sw), (dh, dw) = output_size, stride, dilation
    # One strided NHWC slice per tap, stacked in (kh, kw) order: channel runs stay contiguous, which is several
    # times faster on CPU than F.unfold on the NCHW view of a channels_last image.
    taps = [image[:, i * dh:i * dh + (out_h - 1) * sh + 1:sh, j * dw:j * dw + (out_w - 1) * sw + 1:sw]
            for i in range(kernel_size[0]) for j in range(kernel_size[1])]
    return torch.stack(taps, dim=3).reshape(-1, len(taps) * x.shape[3])


def bsr_conv2d(x, values, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm, out_channels, bias, kernel_size,
               stride, padding, dilation, output_size):
    """Y [B, OH, OW, N] = conv(X [B, H, W, C], W) (+ bias), NHWC."""
    cols = unfold_nhwc(x, kernel_size, stride, padding, dilation, output_size)
    y = bsr_linear(cols, values, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm, out_channels, bias)
    return y.view(x.shape[0], output_size[0], output_size[1], out_channels)


def bsr_conv2d_dgrad(dy, values, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm, in_channels, input_size,
                     kernel_size, stride, padding, dilation):
    """dX [B, H, W, C]: the columns' gradient dY W folded back onto the image (col2im)."""
    batch, out_h, out_w, _ = dy.shape
    taps = kernel_size[0] * kernel_size[1]
    dcols = bsr_linear_dx(dy.reshape(-1, dy.shape[3]), values, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm,
                          taps * in_channels)
    dcols = dcols.view(batch, out_h * out_w, taps, in_channels).permute(0, 3, 2, 1).reshape(batch, -1, out_h * out_w)
    left, right, top, bottom = _conv_padding(input_size, kernel_size, stride, padding, dilation, (out_h, out_w))
    padded_size = (input_size[0] + top + bottom, input_size[1] + left + right)
    image = torch.nn.functional.fold(dcols, padded_size, list(kernel_size), list(dilation), 0, list(stride))
    return torch.nn.functional.pad(image, (-left, -right, -top, -bottom)).permute(0, 2, 3, 1).contiguous()


def bsr_conv2d_wgrad(dy, x, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm, block_size, kernel_size, stride,
                     padding, dilation):
    """dW [nnz, bs, bs]: dYᵀ (im2col X) at the layout's blocks (zero in the padding)."""
    cols = unfold_nhwc(x, kernel_size, stride, padding, dilation, dy.shape[1:3])
    return bsr_sddmm(dy.reshape(-1, dy.shape[3]), cols, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm,
                     block_size)


def bsr_conv2d_grad_scores(dy, x, block_size, kernel_size, stride, padding, dilation):
    """Frobenius norm of every block of the dense filter gradient dYᵀ (im2col X) [N, kh*kw*C]:
    [ceil(N/bs), ceil(K/bs)], fp32 (fp64 for fp64 inputs)."""
    cols = unfold_nhwc(x, kernel_size, stride, padding, dilation, dy.shape[1:3])
    return block_grad_scores(dy.reshape(-1, dy.shape[3]), cols, block_size)
