"""Speedup tables: sparsekern's block-sparse ops against the dense baseline, side by side in one process.

    python -m sparsekern.bench --device cpu [--quick] [--out benchmarks/results]          # the default suite
    python -m sparsekern.bench --device cuda --suite gpu-linear|gpu-optim|gpu-conv|gpu    # the GPU suites
    python -m sparsekern.bench --static                                                   # Triton registers/spills

For each case the dense op (oneDNN/MKL on CPU, cuBLAS/cuDNN on GPU), torch's own sparse formats where they apply,
and every sparsekern backend available on the device (chosen with SPARSEKERN_BACKEND) run interleaved, one call
each per round, so that load from other processes hits all of them alike; the tables show medians.

- ``speedup`` = dense ms / ours ms
- ``frac_ideal`` = (density x dense ms) / ours ms: 1.0 means the sparse op is exactly as efficient per
  stored weight as the dense one.

**Default suite** (``kernels.py``, ``e2e.py``). Cases: Linear M = N = K = 2048, forward and forward+backward (dX
and dW); the convolution layers of a CIFAR ResNet-18 (batch 64; the 3-channel stem is left out, as sparse training
keeps it dense), forward+backward, SparseConv2d against nn.Conv2d, per layer and in total (dense: the faster of
NCHW and channels_last activations; SparseConv2d: channels_last, the format its outputs have). The rows also go to
``<out>/<device-name>.csv``.

End-to-end training throughput (images/s of whole training steps: forward, backward, optimizer step and the
DST bookkeeping), on random batches of the right shape, for the same model, batch and sparsity:

- ``dense``: the torch model and torch.optim.SGD;
- ``simulated``: what users of DST run today, dense weights times a mask: the ``rigl-torch`` package's
  RigLScheduler when it is importable, otherwise a loop written here that multiplies the gradients and the
  weights of dense nn.Conv2d/nn.Linear layers by a fixed mask (same block mask as ours) on every step;
- ``ours``: ``sparsekern.sparsify`` + ``MaskedSGD`` + ``sparsekern.dst.RigL``.

Both DST loops update the mask every 100 steps; the reported rate is amortised over one such interval
(99 ordinary steps and one update step, each a median). The image stem stays dense, as in training.
Cases: CIFAR ResNet-18 (32x32, batch 64 on CPU, 256 on GPU) at 80/90/95% and ImageNet ResNet-50 (224x224,
batch 8 on CPU, 64 on GPU) at the same sparsities; ``--quick`` runs ResNet-18 at 90% only. The rows go to
``<out>/<device-name>_e2e.csv``; with matplotlib, ``<device-name>_speedup.png`` (kernel speedup vs
sparsity per block size) and ``<device-name>_e2e.png`` (images/s) are written next to the CSVs.

**GPU suites** (each module's docstring has the details; all run on a CPU too, with small shapes, for the tests):

- ``gpu_linear.py`` (``--suite gpu-linear``): forward, dX, SDDMM (dW) and block_grad_scores at M, N, K = 8192,
  4096, 4096 in bf16, sparsity 50/75/90/95%, blocks 32/64/128: dense cuBLAS, torch BSR / sampled_addmm, stk
  (128x128 blocks, when importable) and every sparsekern backend; speedup, fraction of ideal, TFLOP/s and fraction
  of the roofline measured here; ``<device-name>_gpu_linear.csv`` and ``.png``.
- ``gpu_optim.py`` (``--suite gpu-optim``): masked_sgd_ bandwidth against the device-to-device copy at densities
  10/50/100%, and layout_update_ of all of ResNet-50's sparse layers; ``<device-name>_gpu_optim.csv``.
- ``gpu_conv.py`` (``--suite gpu-conv``): every distinct ResNet-50 (224x224) and CIFAR ResNet-18 convolution,
  batch 128, bf16, channels_last, at 80/90/95% and blocks 32/64: cuDNN vs SparseConv2d, forward and
  forward+backward, with count-weighted totals; ``<device-name>_gpu_conv.csv`` and ``.png``.

In the GPU suites every implementation is first checked against a high-precision reference (at most twice the
dense same-precision error, design §6); a wrong result is printed loudly, marked MISMATCH in the CSV instead of a
speedup, and makes the command exit 1. On a GPU each candidate is captured in a CUDA graph (enough calls to last
about a millisecond) and its replays are timed with CUDA events, so that small kernels are not measured as their
launch overhead (``--no-graphs``: the calls launched back to back instead).
"""
from .common import available_backends, backend, device_name, time_interleaved, with_backend
from .e2e import (E2E_BLOCK, E2E_FIELDS, E2E_SPARSITIES, E2E_UPDATE_INTERVAL, E2ECase, MaskedDenseLoop,
                  RigLTorchLoop, SparsekernLoop, TrainLoop, bench_e2e, build_e2e_loops, e2e_cases, e2e_rows,
                  format_e2e_table, rigl_torch_scheduler, time_e2e_loops, write_e2e_csv)
from .kernels import (CONV_BATCH, FIELDS, LINEAR_SHAPE, RESNET18_CIFAR_CONVS, _row, bench_linear,
                      bench_resnet18_convs, format_table, write_csv)
from .plots import plot_e2e, plot_kernel_speedup
from .cli import main
