"""Parallel degrees: resolve -1 (the rest), check them against the world size, build a mesh."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from titan_lite.config import Parallelism, Training

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

    def uses_fsdp(self, cpu_offload: bool) -> bool:
        """FSDP2 shards when dp_shard > 1; CPU offload is an FSDP2 policy, so it needs FSDP too;
        and replicas of a TP or PP model are FSDP2 replica groups (HSDP with shards of one
        rank), since DDP does not take DTensor parameters or pipeline stages."""
        return (self.dp_shard > 1 or cpu_offload
                or (self.dp_replicate > 1 and (self.tp > 1 or self.pp > 1)))

    def micro_batch_tokens(self, training: Training, parallelism: Parallelism) -> int:
        """Tokens of one forward on a rank: a pipeline micro-batch's, else the local batch's."""
        rows = (parallelism.pipeline_parallel_microbatch_size if self.pp > 1
                else training.local_batch_size)
        return rows * training.seq_len

    def state_shards(self, cpu_offload: bool) -> int:
        """Into how many pieces the weights, gradients and optimizer states are split, i.e.
        each rank holds 1/state_shards of them: FSDP's shards x TP x PP (replicas copy)."""
        return (self.dp_shard if self.uses_fsdp(cpu_offload) else 1) * self.tp * self.pp


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
    return ParallelDims(degrees["dp_replicate"], degrees["dp_shard"],
                        degrees["tensor_parallel_degree"], degrees["pipeline_parallel_degree"]), []


def build_mesh(dims: ParallelDims, device_type: str, fsdp: bool) -> DeviceMesh | None:
    """One mesh with named dims for every degree > 1, plus ``dp_shard`` whenever FSDP is on
    (FSDP on one rank still needs a mesh to hold its sharding); None when there is no dim."""
    names, sizes = [], []
    # Outermost to innermost: pipeline stages talk least, tensor parallel most (keep it on
    # neighbouring ranks, i.e. within a node).
    for name, size in (("pp", dims.pp), ("dp_replicate", dims.dp_replicate),
                       ("dp_shard", dims.dp_shard), ("tp", dims.tp)):
        if size > 1 or (name == "dp_shard" and fsdp):
            names.append(name)
            sizes.append(size)
    if not names:
        return None
    return init_device_mesh(device_type, tuple(sizes), mesh_dim_names=tuple(names))


def data_parallel_rank(mesh: DeviceMesh | None) -> int:
    """This rank's index among the ranks that see different data (replicas x shards)."""
    rank = 0
    for name in ("dp_replicate", "dp_shard"):
        if mesh is not None and name in (mesh.mesh_dim_names or ()):
            rank = rank * mesh[name].size() + mesh.get_local_rank(name)
    return rank


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The sub-mesh FSDP works on: ``dp_shard``, or (``dp_replicate``, ``dp_shard``) for HSDP."""
    names = tuple(n for n in ("dp_replicate", "dp_shard") if n in (mesh.mesh_dim_names or ()))
    return mesh[names]
