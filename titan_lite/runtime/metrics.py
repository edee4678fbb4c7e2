"""Step metrics (loss, grad norm, lr, tokens/s, MFU, peak memory, ETA) to console, JSONL, TB."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

import torch

from titan_lite.config import Metrics
from titan_lite.runtime.memory import TensorMemoryTracker

# Dense peak TFLOP/s of common GPUs, from vendor sheets: (16-bit tensor cores with float32
# accumulation, float32 without TF32). bfloat16 and float16 run at the same tensor-core rate on
# these parts; T4 and RTX 20xx (Turing) have float16 tensor cores only. TF32 runs at half the
# 16-bit rate on every part here that has it.
GPU_PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "B200": (2250.0, 75.0),
    "H200": (989.0, 67.0),
    "H100 NVL": (835.0, 60.0),
    "H100 PCIe": (756.0, 51.0),
    "H100": (989.0, 67.0),  # SXM
    "H800 PCIe": (756.0, 51.0),
    "H800": (989.0, 67.0),  # SXM
    "A100": (312.0, 19.5),
    "A10G": (70.0, 31.2),
    "A10": (125.0, 31.2),
    "L40S": (362.0, 91.6),
    "L40": (181.0, 90.5),
    "L4": (121.0, 30.3),
    "RTX 4090": (165.2, 82.6),
    "RTX 3090 Ti": (80.0, 40.0),
    "RTX 3090": (71.0, 35.6),
    "RTX 3080 Ti": (68.2, 34.1),
    "RTX 3080": (59.5, 29.8),
    "RTX 3070": (40.6, 20.3),
    "RTX 3060": (25.6, 12.7),
    "RTX 2080 Ti": (53.8, 13.4),
    "RTX 2080": (40.3, 10.1),
    "RTX 2070": (29.9, 7.5),
    "RTX 2060": (25.8, 6.5),
    "T4": (65.0, 8.1),
    "V100": (125.0, 15.7),  # fp16 tensor cores
}


def gpu_peak_flops(device_name: str, dtype: torch.dtype,
                   float32_precision: str = "highest") -> float | None:
    """Peak FLOP/s for a CUDA device name such as 'NVIDIA H100 80GB HBM3', or None if unknown;
    ``float32_precision`` (torch's float32 matmul precision): float32 matmuls run on TF32
    (high) or bfloat16 (medium) tensor cores."""
    for key, (half, single) in GPU_PEAK_TFLOPS.items():  # the more specific names come first
        # whole words only: "L4" is not in "NVIDIA L40", nor "A10" in "A100"
        if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", device_name):
            if dtype != torch.float32 or float32_precision == "medium":
                return half * 1e12
            return (half / 2 if float32_precision == "high" else single) * 1e12
    return None


def tf32_advice(capability: tuple[int, int], compute_dtype: torch.dtype,
                precision: str) -> str | None:
    """A start-up line when float32 matmuls run at full precision on a GPU with TF32 tensor
    cores (compute capability 8.0 and later), None otherwise."""
    if compute_dtype != torch.float32 or precision != "highest" or capability < (8, 0):
        return None
    return ("float32 matmuls run without TF32 on this GPU: training.float32_matmul_precision "
            "= 'high' uses its TF32 tensor cores (~8x the float32 rate), or train in bfloat16 "
            "(training.mixed_precision_param)")


def measure_matmul_flops(dtype: torch.dtype = torch.float32, size: int = 1024,
                         rounds: int = 5, seconds_per_round: float = 0.2) -> float:
    """FLOP/s of a square CPU matmul with this process's threads: the MFU reference on CPU.
    Measured through ``F.linear``, the kernel the model's linears run: in bfloat16 and float16
    a plain ``a @ b`` takes a far slower path on some CPUs (20x seen), which would put MFU
    above 100%.

    The best of several short rounds, so that thread-pool start-up or a busy neighbour at
    start-up does not understate the peak (which would overstate MFU).
    """
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    best = 0.0
    for _ in range(rounds):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds_per_round:
            torch.nn.functional.linear(a, b)
            count += 1
        best = max(best, 2 * size**3 * count / (time.perf_counter() - start))
    return best


def peak_flops(device: torch.device, dtype: torch.dtype, cfg: Metrics,
               float32_precision: str = "highest") -> tuple[float | None, str]:
    """(peak FLOP/s of one rank, where the figure came from) for the MFU column
    (``float32_precision``: see ``gpu_peak_flops``)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, dtype, float32_precision)
        return peak, f"spec sheet of {name}" if peak else f"unknown GPU {name}: no MFU"
    if cfg.cpu_peak_tflops > 0:
        return cfg.cpu_peak_tflops * 1e12, "metrics.cpu_peak_tflops"
    return measure_matmul_flops(dtype), f"measured {dtype} matmul rate on CPU"


def _cpu_peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_memory_bytes(device: torch.device,
                      tracker: TensorMemoryTracker | None = None) -> tuple[int, str]:
    """(peak bytes so far, what was measured): CUDA's allocator peak, the tracked tensors' peak
    on CPU, or the process's peak RSS when CPU tracking is off."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max allocated"
    if tracker is not None:
        return tracker.peak_bytes, "tensors"
    return _cpu_peak_rss_bytes(), "peak RSS"


class MetricsLogger:
    """Rank 0 prints; rank 0 (or every rank, by config) appends JSON lines."""

    def __init__(self, cfg: Metrics, dump_folder: str, rank: int, device: torch.device,
                 flops_per_token: int, peak: float | None, total_steps: int,
                 memory_tracker: TensorMemoryTracker | None = None, first_step: int = 1):
        """``first_step``: the step this run starts at (after a resume, for the ETA)."""
        self.cfg, self.rank, self.device = cfg, rank, device
        self.first_step = first_step
        self.memory_tracker = memory_tracker
        self.flops_per_token, self.peak, self.total_steps = flops_per_token, peak, total_steps
        self.start = time.perf_counter()
        if device.type == "cuda":  # the peak of training, not of loading (e.g. dense NF4 loads)
            torch.cuda.reset_peak_memory_stats(device)
        self.jsonl = None
        if cfg.enable_jsonl and (rank == 0 or cfg.jsonl_all_ranks):
            folder = os.path.join(dump_folder, "metrics")
            os.makedirs(folder, exist_ok=True)
            self.jsonl = open(os.path.join(folder, f"rank{rank}.jsonl"), "w")  # one file per run
        self.tensorboard = None
        if cfg.enable_tensorboard and rank == 0:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.tensorboard = SummaryWriter(os.path.join(dump_folder, "tensorboard"))

    def log(self, step: int, loss: float, grad_norm: float, lr: float, tokens: int,
            seconds: float, optimizer_seconds: float, loss_scale: float | None = None,
            skipped_steps: int = 0) -> dict[str, Any]:
        """Record one interval: ``tokens`` this rank processed in ``seconds`` of wall time, of
        which ``optimizer_seconds`` per step went to clipping and the optimizer step.
        ``loss_scale`` (float16 only): the scale now, after ``skipped_steps`` steps of the
        interval were skipped for inf/NaN gradients."""
        tokens_per_s = tokens / seconds
        memory, memory_kind = peak_memory_bytes(self.device, self.memory_tracker)
        record = {
            "step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr,
            "tokens_per_s": tokens_per_s,
            "mfu_pct": (100 * tokens_per_s * self.flops_per_token / self.peak
                        if self.peak else None),
            "peak_memory_gib": memory / 2**30, "memory_kind": memory_kind,
            "optimizer_s": optimizer_seconds,
            "elapsed_s": time.perf_counter() - self.start,
        }
        if loss_scale is not None:
            record.update(loss_scale=loss_scale, skipped_steps=skipped_steps)
        steps_done = step - self.first_step + 1
        record["eta_s"] = record["elapsed_s"] / steps_done * (self.total_steps - step)
        if self.rank == 0:
            mfu = f"{record['mfu_pct']:.1f}%" if record["mfu_pct"] is not None else "n/a"
            scaling = "" if loss_scale is None else (
                f"  scale {loss_scale:g}" + (f" (skipped {skipped_steps} step(s): inf/nan "
                                             "gradients)" if skipped_steps else ""))
            print(f"step {step:>5}/{self.total_steps}  loss {loss:.4f}  grad_norm "
                  f"{grad_norm:.3f}  lr {lr:.2e}{scaling}  tok/s/rank {tokens_per_s:,.0f}  "
                  f"mfu {mfu}  "
                  f"mem {record['peak_memory_gib']:.2f} GiB ({memory_kind})  "
                  f"eta {_duration(record['eta_s'])}", flush=True)
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tensorboard:
            for key in ("loss", "grad_norm", "lr", "tokens_per_s", "mfu_pct", "peak_memory_gib"):
                if record[key] is not None:
                    self.tensorboard.add_scalar(key, record[key], step)
        return record

    def log_validation(self, step: int, loss: float, perplexity: float, targets: int,
                       seconds: float) -> None:
        """Record one validation: mean loss over ``targets`` held-out target tokens."""
        record = {"step": step, "val_loss": loss, "val_perplexity": perplexity,
                  "val_targets": targets, "val_s": seconds}
        if self.rank == 0:
            print(f"step {step:>5}/{self.total_steps}  val_loss {loss:.4f}  val_ppl "
                  f"{perplexity:.2f}  ({targets:,} target tokens, {seconds:.1f} s)", flush=True)
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tensorboard:
            self.tensorboard.add_scalar("val_loss", loss, step)
            self.tensorboard.add_scalar("val_perplexity", perplexity, step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tensorboard:
            self.tensorboard.close()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class Progress:
    """Progress of a long job of ``total`` items as a bar with the rate and an ETA, sent to
    ``log`` at most every ``every_s`` seconds and when the last item is done."""

    def __init__(self, total: int, unit: str, log: Callable[[str], None] | None,
                 every_s: float = 2.0):
        self.total, self.unit, self.log, self.every_s = total, unit, log, every_s
        self.done = 0
        self.started = self.last_report = time.monotonic()

    def advance(self, items: int, note: str = "") -> None:
        """``items`` more are done; ``note`` (e.g. a throughput) is appended to the line."""
        self.done += items
        now = time.monotonic()
        if self.log is None or (now - self.last_report < self.every_s and
                                self.done < self.total):
            return
        self.last_report = now
        fraction = self.done / max(self.total, 1)
        bar = "#" * round(20 * fraction)
        elapsed = now - self.started
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        self.log(f"[{bar:<20}] {100 * fraction:3.0f}% {self.done}/{self.total} {self.unit}"
                 f"{', ' + note if note else ''}, elapsed {_duration(elapsed)}, "
                 f"ETA {_duration(eta)}")
