"""GPUs the estimator and the planner know: memory, peer bandwidth; the verdict's allowances."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    memory_gib: float  # total memory as torch.cuda reports it
    link_gb_s: float  # per-GPU bandwidth to its peers (NVLink, else PCIe)


GPUS = {
    "H200": Gpu(140.4, 450), "H100": Gpu(79.2, 450), "H100 PCIe": Gpu(79.2, 64),
    "A100-80GB": Gpu(79.2, 300), "A100-40GB": Gpu(39.6, 300), "L40S": Gpu(44.4, 32),
    "A10G": Gpu(22.2, 16), "L4": Gpu(22.0, 16), "RTX 4090": Gpu(23.6, 32),
    "RTX 3090": Gpu(23.7, 32), "RTX 3070": Gpu(7.8, 32), "V100": Gpu(31.7, 150),
}
CUDA_CONTEXT_GIB = 1.0  # CUDA context + NCCL/cuBLAS workspaces, outside the allocator's count
ALLOCATOR_SLACK = 0.05  # caching-allocator fragmentation allowance on top of the traced peak
