"""Parallel degrees: resolve -1 (the rest), check them against the world size, build a mesh."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

if TYPE_CHECKING:
    from titan_lite.config import Parallelism

# Degrees that a later milestone implements; a value other than 1 is refused, never ignored.
_NOT_YET = {
    "dp_shard": "sharded data parallel (FSDP2) is not available yet; use dp_replicate",
    "tensor_parallel_degree": "tensor parallel is not available yet",
    "pipeline_parallel_degree": "pipeline parallel is not available yet",
}


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many ranks see different data."""
        return self.dp_replicate * self.dp_shard


def resolve_degrees(cfg: Parallelism, world_size: int) -> tuple[ParallelDims | None, list[str]]:
    """Return the resolved degrees, or None and one problem line per mistake."""
    problems = []
    degrees = {"dp_replicate": cfg.dp_replicate, "dp_shard": cfg.dp_shard,
               "tensor_parallel_degree": cfg.tensor_parallel_degree,
               "pipeline_parallel_degree": cfg.pipeline_parallel_degree}
    for name, value in degrees.items():
        if value == 0 or value < -1:
            problems.append(f"parallelism.{name}: {value} is not a degree (use >= 1, or -1 for "
                            "'the rest' on the data-parallel dims)")
    auto = [name for name, value in degrees.items() if value == -1]
    if len(auto) > 1:
        problems.append(f"parallelism: only one degree may be -1, got {', '.join(auto)}")
    if problems:
        return None, problems
    fixed = 1
    for value in degrees.values():
        fixed *= max(value, 1)
    if auto:
        if world_size % fixed:
            return None, [f"parallelism: world size {world_size} is not divisible by the product "
                          f"of the fixed degrees ({fixed}), so parallelism.{auto[0]} = -1 has no "
                          "whole value"]
        degrees[auto[0]] = world_size // fixed
    elif fixed != world_size:
        return None, [f"parallelism: the degrees multiply to {fixed} but the world size is "
                      f"{world_size} (dp_replicate {degrees['dp_replicate']} x dp_shard "
                      f"{degrees['dp_shard']} x tensor {degrees['tensor_parallel_degree']} x "
                      f"pipeline {degrees['pipeline_parallel_degree']})"]
    for name, reason in _NOT_YET.items():
        if degrees[name] != 1:
            problems.append(f"parallelism.{name}: {degrees[name]} is not supported: {reason}")
    if problems:
        return None, problems
    return ParallelDims(degrees["dp_replicate"], degrees["dp_shard"],
                        degrees["tensor_parallel_degree"], degrees["pipeline_parallel_degree"]), []


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh | None:
    """One mesh with named dims for every degree > 1 (None in a single process)."""
    names, sizes = [], []
    for name, size in (("dp_replicate", dims.dp_replicate), ("dp_shard", dims.dp_shard),
                       ("tp", dims.tp), ("pp", dims.pp)):
        if size > 1:
            names.append(name)
            sizes.append(size)
    if not names:
        return None
    return init_device_mesh(device_type, tuple(sizes), mesh_dim_names=tuple(names))


def data_parallel_rank(mesh: DeviceMesh | None) -> int:
    """This rank's index among the ranks that see different data."""
    if mesh is None or "dp_replicate" not in (mesh.mesh_dim_names or ()):
        return 0
    return mesh.get_local_rank("dp_replicate")
