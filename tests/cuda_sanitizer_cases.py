"""Small cases of every CUDA GEMM and convolution kernel, to run under compute-sanitizer (tests/test_cuda_kernels.py):

    compute-sanitizer --tool=memcheck python tests/cuda_sanitizer_cases.py [all|small]

Each (dtype, block size) runs the forward with and without bias, the input gradient, the SDDMM with one and with
several M-chunks, and the block scores, on a shape with odd features (element-wise loads) and one with multiples
of 8 (16-byte cp.async loads), both with partial last blocks, M not a multiple of the tile and an empty block-row;
then the four convolution ops on a 3x3 stride-2 layer whose in_channels are a multiple of 8 and not of the block
(16-byte loads, blocks straddling taps), and on the 7x7 stem with 3 channels (element-wise loads). The forward and
input-gradient ops also run on a layout with no blocks, whose index tensors and values have no data pointer.
"small" (for the slower racecheck) keeps fp16 and fp32 and the odd shape. The results are only checked for
being finite: correctness is the job of test_cuda_kernels.py.
"""
import sys

import torch

import sparsekern as sk


def layout_for(n, k, bs, seed):
    grid = (-(-n // bs), -(-k // bs))
    mask = torch.rand(grid, generator=torch.Generator().manual_seed(seed)) < 0.6
    mask[0] = False  # an empty block-row
    mask[-1, -1] = True  # the partial corner block
    return sk.BlockSparseLayout.from_block_mask(mask.cuda(), bs, (n, k))


def empty_layout(n, k, bs):
    grid = (-(-n // bs), -(-k // bs))
    return sk.BlockSparseLayout.from_block_mask(torch.zeros(grid, dtype=torch.bool, device="cuda"), bs, (n, k))


def run_case(dtype, bs, m, n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(dtype=dtype, device="cuda")  # noqa: E731
    layout = layout_for(n, k, bs, seed)
    index = layout.index_tensors()
    values = randn(layout.nnz_blocks, bs, bs)
    x, dy, bias = randn(m, k), randn(m, n), randn(n)
    native = torch.ops.sparsekern
    outputs = [
        native.native_bsr_linear(x, values, *index, n, bias),
        native.native_bsr_linear(x, values, *index, n, None),
        native.native_bsr_linear_dx(dy, values, *index, k),
        native.native_bsr_sddmm(dy, x, *index, bs),
        # 3000 rows and at most a few blocks: several M-chunks, fp32 partials and the summing pass.
        native.native_bsr_sddmm(randn(3000, n), randn(3000, k), *index, bs),
        native.native_block_grad_scores(dy, x, bs),
        native.native_bsr_linear(x, values[:0], *empty_layout(n, k, bs).index_tensors(), n, bias),
        native.native_bsr_linear_dx(dy, values[:0], *empty_layout(n, k, bs).index_tensors(), k),
    ]
    torch.cuda.synchronize()
    for out in outputs:
        assert torch.isfinite(out).all()


def run_conv_case(dtype, bs, cin, kernel, stride, padding, seed):
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(dtype=dtype, device="cuda")  # noqa: E731
    cout, (height, width) = bs + 5, (11, 9)
    out_size = [(n + 2 * padding - kernel) // stride + 1 for n in (height, width)]
    layout = layout_for(cout, kernel * kernel * cin, bs, seed)
    index = layout.index_tensors()
    empty_index = empty_layout(cout, kernel * kernel * cin, bs).index_tensors()
    values = randn(layout.nnz_blocks, bs, bs)
    x, dy, bias = randn(2, height, width, cin), randn(2, *out_size, cout), randn(cout)
    geometry = ([kernel, kernel], [stride, stride], [padding, padding], [1, 1])
    native = torch.ops.sparsekern
    outputs = [
        native.native_bsr_conv2d(x, values, *index, cout, bias, *geometry, out_size),
        native.native_bsr_conv2d_dgrad(dy, values, *index, cin, [height, width], *geometry),
        native.native_bsr_conv2d_wgrad(dy, x, *index, bs, *geometry),
        native.native_bsr_conv2d_grad_scores(dy, x, bs, *geometry),
        native.native_bsr_conv2d(x, values[:0], *empty_index, cout, bias, *geometry, out_size),
        native.native_bsr_conv2d_dgrad(dy, values[:0], *empty_index, cin, [height, width], *geometry),
    ]
    torch.cuda.synchronize()
    for out in outputs:
        assert torch.isfinite(out).all()


def main(subset):
    dtypes = (torch.float16, torch.bfloat16, torch.float32) if subset == "all" else (torch.float16, torch.float32)
    count = 0
    for dtype in dtypes:
        for bs in (16, 32, 64, 128):
            # (M, N, K): odd features, then multiples of 8; the last block-row and block-column partial.
            shapes = [(45, 2 * bs + 7, 3 * bs + 5), (130, 2 * bs + 8, 3 * bs + 8)]
            for seed, (m, n, k) in enumerate(shapes if subset == "all" else shapes[:1]):
                run_case(dtype, bs, m, n, k, seed)
                count += 1
            run_conv_case(dtype, bs, cin=bs + 8, kernel=3, stride=2, padding=1, seed=bs)
            run_conv_case(dtype, bs, cin=3, kernel=7, stride=2, padding=3, seed=bs + 1)
            count += 2
    print(f"{count} cases ran")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "all")
