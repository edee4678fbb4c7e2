"""Will it fit? Per-rank peak memory of a training step, traced without the memory or the GPUs.

``python -m titan_lite.estimate --config JOB.toml [--estimate.num_gpus N] [--estimate.gpu H100]
[--estimate.plan true]`` (or ``./run_train.sh ... --estimate``) builds the configured model and
layout for N ranks and runs real training steps of this trainer on fake tensors
(``FakeTensorMode``: shapes, dtypes and storages, no data) over a fake process group standing
in for rank 0 (and one rank per pipeline stage). A dispatch-mode tracker labels every storage
(parameters, gradients, optimizer states, gathered parameters, activations, ...) and records
the breakdown at the moment device memory peaks. The first step runs untracked (it creates the
optimizer states and fills DTensor's sharding caches, whose fake tensors are not memory); the
second is measured, as the trainer's own peak is. The same tracker measures real CPU runs, so
estimate and measurement count the same bytes (``bench/estimate_accuracy.py``).

Under CPU offload the sharded parameters, gradients and optimizer states (and the optimizer
step's temporaries) are host memory; everything else is device memory. Not counted: the CUDA
context, NCCL and cuBLAS workspaces and allocator fragmentation, which the fit verdict adds as
an allowance (``CUDA_CONTEXT_GIB``, ``ALLOCATOR_SLACK``).
"""

from titan_lite.estimate.gpus import ALLOCATOR_SLACK, CUDA_CONTEXT_GIB, GPUS, Gpu
from titan_lite.estimate.trace import (
    GIB,
    MemoryEstimate,
    RankEstimate,
    estimate_memory,
    job_dims,
    model_args,
)
from titan_lite.estimate.tracker import (
    ACTIVATIONS,
    BACKWARD,
    BUFFERS,
    COMM,
    GATHERED,
    GRADS,
    LABELS,
    OFFLOADED,
    OPTIM,
    OPTIM_STEP,
    PARAMS,
    LabelledTracker,
)

__all__ = [
    "ACTIVATIONS", "ALLOCATOR_SLACK", "BACKWARD", "BUFFERS", "COMM", "CUDA_CONTEXT_GIB",
    "GATHERED", "GIB", "GPUS", "GRADS", "Gpu", "LABELS", "LabelledTracker", "MemoryEstimate",
    "OFFLOADED", "OPTIM", "OPTIM_STEP", "PARAMS", "RankEstimate", "estimate_memory", "job_dims",
    "model_args",
]
