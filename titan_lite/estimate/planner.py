"""The fastest layouts that fit: ``--estimate.plan true`` searches the memory knobs.

Candidates: CPU offload off/on x activation checkpointing none / selective op / full x local
batch (with gradient accumulation keeping the configured global batch) x FSDP degree (the rest
of the data-parallel ranks become HSDP replicas), and with ``estimate.plan_shorter_seq_len``
the sequence length / 2 and / 4 (same tokens per step: more samples), x AdamW's state dtype
(float32, bfloat16, int8) and, offloaded without accumulation, the step in backward
(clipping off), for each fine-tuning
method of ``estimate.plan_methods`` (full, lora, qlora), listed in that order. Tensor and pipeline
degrees and dtypes stay as configured. Each candidate gets a predicted step time from the cost
model (``titan_lite/estimate/cost.py``); they are traced (``titan_lite.estimate``) fastest
first until ``plan_top`` fit, skipping those that cannot: weights + gradients + AdamW states
alone over the memory, or more memory-hungry than one already traced too big (less AC, a larger
local batch, same sharding), or too big by a trace of a few blocks (``shallow_peaks``). With
``estimate.host_memory_gb`` a candidate must also fit that much host memory per rank (and is
skipped untraced when its offloaded weights and states alone do not). Since the step in
backward turns clipping off, it is ranked by the ordinary step's time unless it saves
``IN_BACKWARD_MIN_GAIN`` of the layout's fastest ordinary step; equal times put float32
moments first, then the fewest memory knobs changed, then the smaller per-rank state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from titan_lite.build import check_job
from titan_lite.config import JobConfig
from titan_lite.estimate.cost import (
    ASSUMED_MFU,
    model_stats,
    step_seconds,
    uses_fsdp,
)
from titan_lite.estimate.gpus import GPUS
from titan_lite.estimate.trace import (
    GIB,
    MemoryEstimate,
    RankEstimate,
    estimate_memory,
    job_dims,
    required_gib,
)
from titan_lite.optim import trained_bytes_per_param
from titan_lite.parallel.activation_checkpoint import checkpoint_every

STATE_DTYPE_ORDER = ("float32", "bfloat16", "int8")  # among equal times: the first that fits
IN_BACKWARD_MIN_GAIN = 0.05
DEFAULT_GPU = "H100"  # speeds assumed when only estimate.device_memory_gb is given
AC_CHOICES = (("none", "op"), ("selective", "op"), ("full", "op"))
# The screen (see _screen): blocks of the shallow traces (at 2 blocks FSDP's prefetching of
# an NF4 base streamed per use needs less, seen 72 MiB off), and a margin against its error.
SCREEN_LAYERS = (3, 4, 8)
SCREEN_MARGIN_GIB = 0.25


@dataclass
class Candidate:
    cfg: JobConfig
    overrides: list[str]  # what differs from the configured job, as CLI flags
    step_seconds: float
    state_bytes: float  # weights + gradients + AdamW states per rank on the device
    estimate: MemoryEstimate | None = None
    rank_seconds: float = 0.0  # what the search sorts by: step_seconds unless set otherwise

    def __post_init__(self) -> None:
        self.rank_seconds = self.rank_seconds or self.step_seconds

    @property
    def method(self) -> str:
        return method_of(self.cfg)


def method_of(cfg: JobConfig) -> str:
    if not cfg.lora.enable:
        return "full"
    return "qlora" if cfg.lora.quantize_base == "nf4" else "lora"


def with_method(cfg: JobConfig, method: str) -> JobConfig:
    """``cfg`` fine-tuning with ``method`` (full, lora, qlora); the other lora keys kept."""
    return replace(cfg, lora=replace(cfg.lora, enable=method != "full",
                                     quantize_base="nf4" if method == "qlora" else "none"))


def plan(cfg: JobConfig, num_gpus: int, capacity_gib: float, gpu_name: str,
         log: Callable[[str], None] | None = None) -> list[Candidate]:
    """For each method of ``estimate.plan_methods`` in order, its fastest
    ``estimate.plan_top`` candidates that fit, fastest first. ``log`` gets a line per traced
    candidate (a 70B trace takes minutes)."""
    found = [candidate for method in cfg.estimate.plan_methods
             for candidate in _plan_method(with_method(cfg, method), num_gpus, capacity_gib,
                                           gpu_name, log)]
    for candidate in found:  # what to change in the job as configured, the method included
        candidate.overrides = _overrides(cfg, candidate.cfg)
    return found


def _plan_method(cfg: JobConfig, num_gpus: int, capacity_gib: float, gpu_name: str,
                 log: Callable[[str], None] | None) -> list[Candidate]:
    gpu = gpu_name if gpu_name in GPUS else DEFAULT_GPU
    # Equal predicted times (compute-bound layouts): float32 moments first, then the fewest
    # memory knobs added, then the smaller per-rank state (more margin).
    configured_knobs = _memory_knobs(cfg)
    candidates = sorted(_candidates(cfg, num_gpus, gpu), key=lambda c: (
        c.rank_seconds, STATE_DTYPE_ORDER.index(c.cfg.optimizer.state_dtype),
        c.cfg.optimizer.in_backward > cfg.optimizer.in_backward,
        len(_memory_knobs(c.cfg) - configured_knobs), c.state_bytes))
    host_gib = cfg.estimate.host_memory_gb
    fitting: list[Candidate] = []
    too_big: list[tuple[Candidate, str, float]] = []  # where ("device", "host"), GiB over
    for candidate in candidates:
        if len(fitting) == cfg.estimate.plan_top:
            break
        host_bound = _host_state_bytes(candidate.cfg, num_gpus) / GIB
        if candidate.state_bytes / GIB > capacity_gib or (host_gib and host_bound > host_gib) \
                or any(_needs_at_least(candidate, big, where)
                       or _optimizer_cannot_close(candidate, big, where, over, num_gpus)
                       for big, where, over in too_big):
            continue
        started = time.monotonic()
        excess, finding = _judge(candidate, num_gpus, capacity_gib, host_gib)
        if excess is None:
            fitting.append(candidate)
        else:
            too_big.append((candidate, *excess))
        if log is not None:
            log(f"plan: {method_of(cfg)} {' '.join(candidate.overrides) or 'as configured'}"
                f": {finding} ({time.monotonic() - started:.0f} s)")
    return fitting


def _judge(candidate: Candidate, num_gpus: int, capacity_gib: float, host_gib: float
           ) -> tuple[tuple[str, float] | None, str]:
    """Whether ``candidate`` fits, by the screen or else a full trace (kept in its
    ``estimate``): (None, or where it is too big and by how many GiB), and what was found."""
    screened = _screen(candidate.cfg, num_gpus, capacity_gib, host_gib)
    if screened is not None:
        where, over, blocks = screened
        return (where, over), (f"too big for the {where} by at least {over:.2f} GiB (traced "
                               f"with up to {blocks} blocks)")
    estimate = candidate.estimate = estimate_memory(candidate.cfg, num_gpus)
    device, host = estimate.required_gib(), estimate.worst.host_peak / GIB
    excess = _excess(device, host, capacity_gib, host_gib)
    verdict = f"too big for the {excess[0]}" if excess else "fits"
    return excess, f"needs {device:.2f} GiB, host {host:.1f} GiB: {verdict}"


def _excess(device_gib: float, host_gib: float, capacity_gib: float, host_limit_gib: float,
            margin_gib: float = 0.0) -> tuple[str, float] | None:
    """Where a layout needing ``device_gib`` and ``host_gib`` is too big by more than
    ``margin_gib`` ("device" first, "host" when ``host_limit_gib`` is set), and by how much."""
    if device_gib > capacity_gib + margin_gib:
        return "device", device_gib - capacity_gib
    if host_limit_gib and host_gib > host_limit_gib + margin_gib:
        return "host", host_gib - host_limit_gib
    return None


def _screen(cfg: JobConfig, num_gpus: int, capacity_gib: float, host_gib: float
            ) -> tuple[str, float, int] | None:
    """("device" or "host", GiB over at least, the most blocks traced) when ``shallow_peaks``
    through 3 and 4 blocks, or else through 4 and 8 (tighter where a phase that grows faster
    per block takes over at depth: no AC's activations over the loss's logits, seen on the
    70B), says a layout is too big by more than ``SCREEN_MARGIN_GIB``; None when it may fit
    or cannot be screened."""
    if model_stats(cfg).n_layers <= 2 * SCREEN_LAYERS[-1]:
        return None  # about as fast to trace in full
    traced: dict[int, RankEstimate] = {}
    for pair in zip(SCREEN_LAYERS, SCREEN_LAYERS[1:]):
        peaks = shallow_peaks(cfg, num_gpus, pair, traced)
        if peaks is None:
            return None
        excess = _excess(required_gib(peaks[0]), peaks[1], capacity_gib, host_gib,
                         SCREEN_MARGIN_GIB)
        if excess is not None:
            return *excess, pair[1]
    return None


def shallow_peaks(cfg: JobConfig, num_gpus: int, layers: tuple[int, int],
                  traced: dict[int, RankEstimate] | None = None) -> tuple[float, float] | None:
    """The job's device and host peaks (GiB) extended to its depth from traces of the model with
    ``layers`` blocks (``traced``: those already made, by depth); None for a model of no more
    blocks, pipeline stages, or AC of every k-th block. Each block adds the same weights,
    states and saved activations, so the memory of every phase is affine in the depth and the
    peak, their maximum, is convex: the line through two depths, extended beyond them, lies
    under it (a lower bound; equal in the checks of tests/test_estimate.py)."""
    ac = cfg.activation_checkpoint
    depth = model_stats(cfg).n_layers
    fewer, more = layers
    if (depth <= more or job_dims(cfg, num_gpus).pp > 1
            or (ac.mode == "selective" and checkpoint_every(ac.selective_ac_option))):
        return None
    traced = {} if traced is None else traced
    for n in layers:
        if n not in traced:
            traced[n] = estimate_memory(cfg, num_gpus, n).worst
    shallow, deeper = traced[fewer], traced[more]

    def extended(a: int, b: int) -> float:
        return (a + (depth - fewer) * (b - a) / (more - fewer)) / GIB

    return (extended(shallow.device_peak, deeper.device_peak),
            extended(shallow.host_peak, deeper.host_peak))


def _candidates(cfg: JobConfig, num_gpus: int, gpu: str) -> list[Candidate]:
    dims = job_dims(cfg, num_gpus)
    t = cfg.training
    samples_per_rank = (t.local_batch_size if t.global_batch_size == -1
                        else t.global_batch_size // dims.dp)
    # Shorter sequences (only when allowed) keep the tokens per step: more, shorter samples.
    shorter = [2, 4] if cfg.estimate.plan_shorter_seq_len and dims.pp == 1 else []
    found = []
    for factor in [1] + [f for f in shorter if t.seq_len % f == 0]:
        sequences = replace(cfg, training=replace(t, seq_len=t.seq_len // factor))
        local_batches = [b for b in _divisors(samples_per_rank * factor)
                         if dims.pp == 1 or b == t.local_batch_size]  # PP: its micro-batching
        for shard in _divisors(dims.dp):
            for offload in (False, True):
                for mode, option in AC_CHOICES:
                    for local in local_batches:
                        layout = _layout(
                            cfg, sequences, num_gpus, shard, dims.dp // shard,
                            (dims.dp_shard, dims.dp_replicate), offload, mode, option, local,
                            samples_per_rank * factor)
                        found += [c for knobbed in _memory_knob_variants(layout)
                                  for c in _optimizer_variants(cfg, knobbed, num_gpus, gpu)
                                  if not check_job(c.cfg, num_gpus, training_here=False)]
    return found


def _memory_knob_variants(candidate: JobConfig) -> list[JobConfig]:
    """``candidate`` as configured and with each memory knob that saves device memory at little
    time: the loss in slices (training.loss_chunks 0, auto), a frozen embedding table in host
    memory (LoRA and QLoRA), full AC's saved block inputs in host memory."""
    t, lora, ac = candidate.training, candidate.lora, candidate.activation_checkpoint
    variants = [candidate]
    if t.loss_chunks != 0:
        variants += [replace(v, training=replace(v.training, loss_chunks=0)) for v in variants]
    if lora.enable and not lora.embedding_on_host:
        variants += [replace(v, lora=replace(v.lora, embedding_on_host=True)) for v in variants]
    if ac.mode == "full" and not ac.offload:
        variants += [replace(v, activation_checkpoint=replace(v.activation_checkpoint,
                                                              offload=True)) for v in variants]
    return variants


def _memory_knobs(cfg: JobConfig) -> set[str]:
    """The memory knobs ``cfg`` turns on (more of them: no more device memory)."""
    return {name for name, on in (("loss slices", cfg.training.loss_chunks != 1),
                                  ("embedding on host", cfg.lora.embedding_on_host),
                                  ("activation offload", cfg.activation_checkpoint.offload))
            if on}


def _optimizer_variants(cfg: JobConfig, candidate: JobConfig, num_gpus: int,
                        gpu: str) -> list[Candidate]:
    """``candidate`` with each AdamW state dtype, and offloaded without accumulation also
    stepping in backward (which turns clipping off: training.max_norm 0)."""
    t = candidate.training
    accumulates = t.global_batch_size not in (-1, t.local_batch_size * job_dims(
        candidate, num_gpus).dp)
    in_backward = [False, True] if t.enable_cpu_offload and not accumulates else [False]
    variants = []
    for step_in_backward in in_backward:
        for state_dtype in STATE_DTYPE_ORDER:
            optimizer = replace(candidate.optimizer, state_dtype=state_dtype,
                                in_backward=step_in_backward)
            training = replace(t, max_norm=0.0) if step_in_backward else t
            new = replace(candidate, optimizer=optimizer, training=training)
            variants.append(Candidate(new, _overrides(cfg, new), step_seconds(new, num_gpus, gpu),
                                      _state_bytes(new, num_gpus)))
    # The step in backward gives up clipping: ranked ahead for speed only when it saves at
    # least IN_BACKWARD_MIN_GAIN of the layout's fastest ordinary step (it may still be what
    # fits host memory). Against its own dtype's step it would rank LoRA's int8 adapter moments
    # (a slow host step it hides) ahead of float32 ones for a gain of <1%.
    ordinary = {c.cfg.optimizer.state_dtype: c.step_seconds for c in variants
                if not c.cfg.optimizer.in_backward}
    fastest = min(ordinary.values())
    for c in variants:
        if c.cfg.optimizer.in_backward and c.step_seconds > (1 - IN_BACKWARD_MIN_GAIN) * fastest:
            c.rank_seconds = ordinary[c.cfg.optimizer.state_dtype]
    return variants


def _layout(cfg: JobConfig, base: JobConfig, num_gpus: int, shard: int, replicas: int,
            configured: tuple[int, int], offload: bool, mode: str, option: str, local: int,
            samples_per_rank: int) -> JobConfig:
    """``base`` (``cfg`` or it with a shorter sequence) with these knobs."""
    global_batch = samples_per_rank * shard * replicas
    keep = local == samples_per_rank and base.training.seq_len == cfg.training.seq_len
    training = replace(base.training, enable_cpu_offload=offload, local_batch_size=local,
                       global_batch_size=cfg.training.global_batch_size if keep
                       else global_batch)
    parallelism = (cfg.parallelism if (shard, replicas) == configured
                   else replace(cfg.parallelism, dp_shard=shard, dp_replicate=replicas))
    ac = replace(cfg.activation_checkpoint, mode=mode, selective_ac_option=option)
    new = replace(base, training=training, parallelism=parallelism, activation_checkpoint=ac)
    if not uses_fsdp(new, num_gpus) and new.training.mixed_precision_reduce != "float32":
        new = replace(new, training=replace(new.training, mixed_precision_reduce="float32"))
    return new


def _state_bytes(cfg: JobConfig, num_gpus: int) -> float:
    """Weights + gradients + AdamW states per rank on the device (0 under offload)."""
    return 0.0 if cfg.training.enable_cpu_offload else _weights_and_states(cfg, num_gpus)


def _host_state_bytes(cfg: JobConfig, num_gpus: int) -> float:
    """At least what CPU offload keeps per rank in host memory (0 without offload)."""
    return _weights_and_states(cfg, num_gpus) if cfg.training.enable_cpu_offload else 0.0


def _weights_and_states(cfg: JobConfig, num_gpus: int) -> float:
    """Weights + gradients + AdamW states per rank: float32 ones for trained weights (no
    gradients stepped in backward), the storage alone for a frozen base."""
    dims = job_dims(cfg, num_gpus)
    stats = model_stats(cfg)
    state = stats.weight_bytes + (trained_bytes_per_param(cfg.optimizer) - 4) * stats.trainable
    return state / dims.state_shards(cfg.training.enable_cpu_offload)


def _optimizer_cannot_close(candidate: Candidate, too_big: Candidate, where: str,
                            over_gib: float, num_gpus: int) -> bool:
    """Whether ``candidate`` differs from ``too_big`` only in its optimizer (state dtype, the
    step in backward and the clipping it turns off), which saves at most the difference of
    their weights + gradients + AdamW states where ``too_big`` was ``over_gib`` too big: less
    than that (LoRA's adapters: megabytes against gigabytes)."""
    a, b = candidate.cfg, too_big.cfg
    if replace(a, optimizer=b.optimizer, training=replace(a.training, max_norm=b.training.max_norm)
               ) != b:
        return False
    state = _state_bytes if where == "device" else _host_state_bytes
    return (state(b, num_gpus) - state(a, num_gpus)) / GIB < over_gib


def _needs_at_least(candidate: Candidate, too_big: Candidate, where: str) -> bool:
    """Whether ``candidate`` needs at least the ``where`` ("device" or "host") memory of
    ``too_big``: same sharding, method and offload, no more activation checkpointing, no
    smaller local batch, and on the device no memory knob that ``too_big`` lacks and (unless
    offloaded: the optimizer's memory is on the host) no fewer bytes per trained parameter; on
    the host no fewer bytes per trained parameter and every knob that adds host memory that
    ``too_big`` has."""
    a, b = candidate.cfg, too_big.cfg
    order = [mode for mode, _ in AC_CHOICES][::-1]  # full, selective, none: more memory
    same = (a.parallelism == b.parallelism
            and (a.lora.enable, a.lora.quantize_base) == (b.lora.enable, b.lora.quantize_base)
            and a.training.enable_cpu_offload == b.training.enable_cpu_offload
            and order.index(a.activation_checkpoint.mode)
            >= order.index(b.activation_checkpoint.mode)
            and a.training.local_batch_size >= b.training.local_batch_size)
    more_optimizer = trained_bytes_per_param(a.optimizer) >= trained_bytes_per_param(b.optimizer)
    if where == "host":
        host_knobs = _memory_knobs(b) - {"loss slices"}
        return same and more_optimizer and host_knobs <= _memory_knobs(a)
    return same and _memory_knobs(a) <= _memory_knobs(b) and (
        a.training.enable_cpu_offload or more_optimizer)


def _overrides(base: JobConfig, new: JobConfig) -> list[str]:
    flags = []
    for section in ("training", "parallelism", "activation_checkpoint", "lora", "optimizer"):
        for key, value in vars(getattr(new, section)).items():
            if getattr(getattr(base, section), key) != value:
                text = str(value).lower() if isinstance(value, bool) else str(value)
                flags.append(f"--{section}.{key} {text}")
    return flags


def format_plan(candidates: list[Candidate], cfg: JobConfig, num_gpus: int,
                capacity_gib: float, gpu_name: str) -> str:
    """The planner's table, and the best candidate as TOML to paste into the job's file."""
    head = (f"llama3 {cfg.model.flavor} on {num_gpus} x {gpu_name or 'GPU'} "
            f"({capacity_gib:.1f} GiB each); speeds assume "
            f"{gpu_name if gpu_name in GPUS else DEFAULT_GPU} at {ASSUMED_MFU:.0%} MFU")
    if not candidates:
        return (f"{head}\nnothing fits: no combination of method "
                f"({', '.join(cfg.estimate.plan_methods)}), CPU offload, activation "
                "checkpointing, local batch and FSDP degree; add GPUs, a method "
                "(estimate.plan_methods) or pick a smaller flavor")
    lines = [head, "| # | method | tokens/s/GPU | needs GiB | margin GiB | host GiB/rank | "
             "overrides |", "|---|---|---|---|---|---|---|"]
    for i, c in enumerate(candidates, 1):
        assert c.estimate is not None
        need = c.estimate.required_gib()
        tokens = c.cfg.training.seq_len * _global_samples(c.cfg, num_gpus)
        lines.append(f"| {i} | {c.method} | {tokens / c.step_seconds / num_gpus:,.0f} | "
                     f"{need:.1f} | "
                     f"{capacity_gib - need:+.1f} | {c.estimate.worst.host_peak / GIB:.1f} | "
                     f"{' '.join(c.overrides) or '(as configured)'} |")
    lines += ["", "# the fastest, as TOML:"] + _toml(candidates[0].cfg)
    return "\n".join(lines)


def _toml(cfg: JobConfig) -> list[str]:
    t, p, ac, lora = cfg.training, cfg.parallelism, cfg.activation_checkpoint, cfg.lora
    return ["[lora]", f"enable = {str(lora.enable).lower()}",
            f'quantize_base = "{lora.quantize_base}"',
            f"embedding_on_host = {str(lora.embedding_on_host).lower()}",
            "[training]", f"seq_len = {t.seq_len}", f"local_batch_size = {t.local_batch_size}",
            f"global_batch_size = {t.global_batch_size}",
            f"enable_cpu_offload = {str(t.enable_cpu_offload).lower()}",
            f'mixed_precision_reduce = "{t.mixed_precision_reduce}"',
            f"max_norm = {t.max_norm}", f"loss_chunks = {t.loss_chunks}",
            "[parallelism]", f"dp_replicate = {p.dp_replicate}", f"dp_shard = {p.dp_shard}",
            "[optimizer]", f'state_dtype = "{cfg.optimizer.state_dtype}"',
            f"in_backward = {str(cfg.optimizer.in_backward).lower()}",
            "[activation_checkpoint]", f'mode = "{ac.mode}"',
            f'selective_ac_option = "{ac.selective_ac_option}"',
            f"offload = {str(ac.offload).lower()}"]


def _global_samples(cfg: JobConfig, num_gpus: int) -> int:
    dims = job_dims(cfg, num_gpus)
    t = cfg.training
    return t.local_batch_size * dims.dp if t.global_batch_size == -1 else t.global_batch_size


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


