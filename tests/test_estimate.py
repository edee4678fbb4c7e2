"""The memory estimator: agrees with measured peaks, reproduces the published arithmetic, plans,
and refuses bad input."""

import glob
import json
import subprocess
import sys
from dataclasses import replace

import pytest
from conftest import CPU_ENV, REPO, python_env
from dist_helpers import run_distributed
from layouts import train_as_rank

from titan_lite.config import load_config
from titan_lite.estimate import (
    GIB,
    GPUS,
    GRADS,
    OPTIM,
    PARAMS,
    estimate_memory,
)
from titan_lite.estimate.planner import _candidates, _toml, format_plan, plan
from titan_lite.estimate.report import main as estimate_main
from titan_lite.train import train

# The estimator traces the trainer's own step with the same tensor tracker the trainer reports
# on CPU; bench/estimate_accuracy.py sees 0-3% differences. The tests allow 10% (the target).
TOLERANCE = 0.10
SHAPE = ["--training.local_batch_size", "4", "--training.seq_len", "256",
         "--metrics.cpu_peak_tflops", "1", "--metrics.jsonl_all_ranks", "true"]


def measured_peak_gib(folder) -> float:
    peaks = []
    for path in glob.glob(str(folder / "metrics" / "rank*.jsonl")):
        with open(path) as fh:
            peaks += [json.loads(line)["peak_memory_gib"] for line in fh]
    return max(peaks)


def estimated_peak_gib(overrides: list[str], ranks: int) -> float:
    estimate = estimate_memory(load_config(overrides), ranks)
    return max(r.total_peak for r in estimate.ranks) / GIB


@pytest.mark.parametrize("overrides", [
    [], ["--activation_checkpoint.mode", "full"],
    ["--activation_checkpoint.mode", "selective"], ["--training.global_batch_size", "8"],
], ids=["no-ac", "ac-full", "ac-op", "accumulation"])
def test_one_process_estimate_matches_the_measured_peak(repo_cwd, tmp_path, overrides):
    job = [*SHAPE, "--training.steps", "2", "--job.dump_folder", str(tmp_path), *overrides]
    train(load_config(job), CPU_ENV)
    measured = measured_peak_gib(tmp_path)
    assert estimated_peak_gib(job, 1) == pytest.approx(measured, rel=TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    [], ["--parallelism.pipeline_parallel_degree", "2",
         "--parallelism.pipeline_parallel_microbatch_size", "1",
         "--parallelism.pipeline_parallel_schedule", "1F1B"],
    ["--parallelism.tensor_parallel_degree", "2"],
    ["--training.enable_cpu_offload", "true", "--training.global_batch_size", "16"],
    ["--training.enable_cpu_offload", "true", "--optimizer.in_backward", "true",
     "--optimizer.state_dtype", "int8", "--training.max_norm", "0"],
], ids=["fsdp", "pp-1f1b", "tp", "fsdp-offload-accumulation", "offload-in-backward-int8"])
def test_two_rank_estimate_matches_the_measured_peak(repo_cwd, tmp_path, overrides):
    job = [*SHAPE, "--training.steps", "2", "--job.dump_folder", str(tmp_path), *overrides]
    run_distributed(train_as_rank, 2, job)
    measured = measured_peak_gib(tmp_path)
    assert estimated_peak_gib(job, 2) == pytest.approx(measured, rel=TOLERANCE)


def test_8b_breakdown_is_the_published_arithmetic(repo_cwd):
    """8.03e9 params, fp32 weights and AdamW sharded over 2 GPUs: 8.03e9 x 4 B x 3 / 2 = 48 GB
    of weights + AdamW states, 64 GB with the fp32 gradients; exact to the byte (plus AdamW's
    per-tensor step counters)."""
    cfg = load_config(["--config", "train_configs/llama3_8b.toml", "--training.seq_len", "64"])
    estimate = estimate_memory(cfg, 2)
    state, n = estimate.worst.state, estimate.num_params
    assert n == 8_030_261_248
    step_counters = 4 * 291  # one float32 step per parameter tensor
    assert state[PARAMS] == n * 4 // 2 and state[GRADS] == n * 4 // 2
    assert state[OPTIM] == n * 4 * 2 // 2 + step_counters
    assert (state[PARAMS] + state[OPTIM]) / 1e9 == pytest.approx(48.18, abs=0.01)
    assert (state[PARAMS] + state[GRADS] + state[OPTIM]) / 1e9 == pytest.approx(64.24, abs=0.01)
    assert estimate.worst.device[PARAMS] == state[PARAMS]  # on the device without offload

    offloaded = estimate_memory(load_config(
        ["--config", "train_configs/llama3_8b.toml", "--training.seq_len", "64",
         "--training.enable_cpu_offload", "true"]), 2)
    device, host = offloaded.worst.device, offloaded.worst.host
    assert PARAMS not in device and OPTIM not in device and GRADS not in device
    assert host[PARAMS] + host[OPTIM] == state[PARAMS] + state[OPTIM]
    assert offloaded.worst.device_peak < estimate.worst.device_peak - 40e9


def test_8b_shaped_host_memory_with_the_step_in_backward_and_int8_moments(repo_cwd, tmp_path):
    """Llama 3 8B's shapes with 2 blocks (an 8B traces 16x slower), one GPU, CPU offload:
    float32 weights + int8 moments (2 B + two float32 scales per 256 for every matrix; float32
    for the norm vectors) + the gradients of two units at most (the root's embeddings and
    output, and a block), exact to the byte; the 8B itself: docs/will-it-fit.md."""
    import transformers
    config = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, num_hidden_layers=2, vocab_size=128_256, rope_theta=500_000.0)
    (tmp_path / "config.json").write_text(config.to_json_string())
    cfg = load_config(["--model.flavor", "auto", "--model.init_from", str(tmp_path),
                       "--tokenizer.path", str(tmp_path / "absent"), "--training.seq_len", "64",
                       "--training.local_batch_size", "1", "--training.enable_cpu_offload",
                       "true", "--optimizer.in_backward", "true", "--optimizer.state_dtype",
                       "int8", "--training.max_norm", "0"])
    estimate = estimate_memory(cfg, 1)
    root, block = 2 * 128_256 * 4096 + 4096, 218_112_000  # (a block with its two norms)
    n, norms, tensors = root + 2 * block, 5 * 4096, 3 + 2 * 9
    assert estimate.num_params == n
    moments = (n - norms) * (2 + 8 / 256) + norms * 8 + 4 * tensors  # + the step counters
    assert estimate.worst.state[OPTIM] == moments
    assert estimate.worst.host[GRADS] <= 4 * (root + block)
    assert estimate.worst.host_peak <= 4 * n + moments + 4 * (root + block) + 2**20


def test_planner_fits_host_memory_with_the_host_optimizer_knobs(repo_cwd):
    """Offloaded, the debug model's host memory falls by ~45% stepping in backward with int8
    moments; given a host limit between the two and a device that needs offload, the planner
    proposes the step in backward, and says that clipping goes off."""
    shape = ["--training.local_batch_size", "1", "--training.seq_len", "128",
             "--activation_checkpoint.mode", "full", "--training.enable_cpu_offload", "true"]
    plain = estimate_memory(load_config(shape), 1)
    knobs = estimate_memory(load_config([*shape, "--optimizer.in_backward", "true", "--training"
                                         ".max_norm", "0", "--optimizer.state_dtype", "int8"]), 1)
    assert knobs.worst.host_peak < 0.6 * plain.worst.host_peak  # seen: 0.051 vs 0.093 GiB
    device = plain.required_gib() + 0.01
    on_device = load_config([*shape[:6], "--optimizer.state_dtype", "int8"])
    assert estimate_memory(on_device, 1).required_gib() > device  # the device needs offload
    host = (plain.worst.host_peak + knobs.worst.host_peak) / 2 / GIB
    cfg = load_config([*shape[:4], "--estimate.plan_top", "1",
                       "--estimate.host_memory_gb", str(host)])
    (found,) = plan(cfg, 1, device, "RTX 4090")
    assert found.cfg.training.enable_cpu_offload and found.cfg.optimizer.in_backward
    assert found.estimate.worst.host_peak / GIB <= host
    assert "--training.max_norm 0.0" in found.overrides  # clipping off, said


def test_planner_finds_what_fits_and_prints_pasteable_toml(repo_cwd, tmp_path):
    """The debug model at 8 x 2048 needs ~3.7 GiB; at 2.5 GiB per GPU only memory-saving
    layouts (AC, smaller micro-batches with accumulation, offload) fit, fastest first."""
    cfg = load_config(["--training.local_batch_size", "8", "--training.seq_len", "2048",
                       "--estimate.plan_top", "3"])
    assert estimate_memory(cfg, 2).required_gib() > 2.5
    traced: list[str] = []  # a line per traced candidate, the fitting ones among them
    found = plan(cfg, 2, 2.5, "RTX 4090", log=traced.append)
    assert 1 <= len(found) <= 3
    assert all(c.estimate.required_gib() <= 2.5 for c in found)
    assert len(traced) > len(found) and sum(line.endswith("s)") and ": fits (" in line
                                            for line in traced) == len(found)
    assert [c.step_seconds for c in found] == sorted(c.step_seconds for c in found)
    assert found[0].overrides  # the job as configured does not fit
    text = format_plan(found, cfg, 2, 2.5, "RTX 4090")
    assert "| 1 |" in text and " ".join(found[0].overrides) in text
    toml = tmp_path / "best.toml"
    toml.write_text("\n".join(_toml(found[0].cfg)) + "\n")
    loaded = load_config(["--config", str(toml)])
    assert loaded.activation_checkpoint == found[0].cfg.activation_checkpoint
    assert loaded.training.enable_cpu_offload == found[0].cfg.training.enable_cpu_offload


def test_planner_tries_shorter_sequences_only_when_allowed_and_keeps_the_tokens():
    base = ["--training.local_batch_size", "2", "--training.seq_len", "2048"]
    for allowed, lengths in (("false", {2048}), ("true", {2048, 1024, 512})):
        cfg = load_config([*base, "--estimate.plan_shorter_seq_len", allowed])
        candidates = _candidates(cfg, 2, "H100")
        assert {c.cfg.training.seq_len for c in candidates} == lengths
        for c in candidates:
            t = c.cfg.training
            samples = 2 * 2 if t.global_batch_size == -1 else t.global_batch_size
            assert samples * t.seq_len == 2 * 2 * 2048  # the tokens of one optimizer step


def run_estimate(*args: str, ngpu: str = "1") -> subprocess.CompletedProcess:
    return subprocess.run(["./run_train.sh", "--estimate", *args], cwd=REPO,
                          env=python_env(NGPU=ngpu), capture_output=True, text=True, timeout=120)


def test_run_train_estimate_gives_a_verdict_without_training(tmp_path):
    result = run_estimate("--estimate.gpu", "RTX 4090", "--job.dump_folder", str(tmp_path),
                          ngpu="2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 rank(s): FSDP 2" in result.stdout
    assert f"FITS on RTX 4090 ({GPUS['RTX 4090'].memory_gib:.1f} GiB)" in result.stdout
    assert not (tmp_path / "metrics").exists()  # nothing trained


@pytest.mark.parametrize("args, message", [
    (["--estimate.gpu", "H1000"], "config error: estimate.gpu: unknown GPU 'H1000'; known: H200"),
    (["--estimate.device_memory_gb", "-1"],
     "config error: --estimate.device_memory_gb: -1.0 is below the minimum 0"),
    (["--estimate.plan", "true"], "config error: estimate.plan: needs estimate.gpu or"),
], ids=["unknown-gpu", "negative-memory", "plan-without-memory"])
def test_bad_estimate_input_exits_2_with_the_key(repo_cwd, capsys, args, message):
    """In this process (run_train.sh --estimate execs this main; its start costs ~5 s)."""
    with pytest.raises(SystemExit) as exit_:
        estimate_main(["--config", "train_configs/debug_model.toml", *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_estimate_cli_is_also_a_module(tmp_path):
    result = subprocess.run([sys.executable, "-m", "titan_lite.estimate", "--estimate.num_gpus",
                             "2", "--parallelism.tensor_parallel_degree", "2",
                             "--estimate.device_memory_gb", "1"], cwd=REPO, env=python_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 rank(s): TP 2" in result.stdout and "DOES NOT FIT" in result.stdout


def test_planner_proposes_each_method_full_first_with_its_frozen_base_counted(tmp_path):
    cfg = load_config(["--training.local_batch_size", "2", "--training.seq_len", "256",
                       "--estimate.plan_top", "1", "--estimate.plan_methods",
                       "full,lora,qlora"])
    found = plan(cfg, 1, 20.0, "RTX 4090")
    assert [c.method for c in found] == ["full", "lora", "qlora"]
    full, lora, qlora = found
    # weights + gradients + AdamW: 16 B per trained parameter; a frozen base only its storage
    assert qlora.state_bytes < lora.state_bytes < full.state_bytes / 5
    assert lora.estimate.trainable_params < lora.estimate.num_params / 10
    assert "| qlora |" in format_plan(found, cfg, 1, 20.0, "RTX 4090")
    toml = tmp_path / "qlora.toml"
    toml.write_text("\n".join(_toml(qlora.cfg)) + "\n")
    loaded = load_config(["--config", str(toml)])
    assert loaded.lora.enable and loaded.lora.quantize_base == "nf4"


def test_embedding_on_host_takes_the_table_out_of_device_memory():
    from titan_lite.estimate.trace import model_args
    from titan_lite.estimate.tracker import HOST_WEIGHTS

    base = ["--training.local_batch_size", "2", "--training.seq_len", "128", "--lora.enable",
            "true", "--training.mixed_precision_param", "bfloat16"]
    on_device = estimate_memory(load_config(base), 2)  # FSDP over 2 ranks
    on_host = estimate_memory(load_config([*base, "--lora.embedding_on_host", "true"]), 2)
    args = model_args(on_host.cfg)
    table = args.vocab_size * args.dim * 2  # bfloat16, whole on every rank
    assert on_host.worst.host[HOST_WEIGHTS] == table
    # FSDP gathers the root (embedding, norm, output) for the whole step: the full table
    assert on_device.worst.device_peak - on_host.worst.device_peak >= table


def test_qlora_on_one_gpu_under_offload_keeps_its_nf4_base_in_host_memory():
    """One shard: the NF4 block linears stay in host memory and stream to the GPU per use, so
    the device holds at most one of them (a copy) beside what the base on the device holds."""
    from titan_lite.build import build_meta_model
    from titan_lite.estimate.trace import model_args
    from titan_lite.estimate.tracker import HOST_WEIGHTS
    from titan_lite.finetune.lora import block_linears
    from titan_lite.finetune.nf4 import BYTES_PER_WEIGHT

    base = ["--training.local_batch_size", "2", "--training.seq_len", "128", "--lora.enable",
            "true", "--lora.quantize_base", "nf4", "--training.mixed_precision_param",
            "bfloat16", "--activation_checkpoint.mode", "full"]
    on_device = estimate_memory(load_config(base), 1)
    streamed = estimate_memory(load_config([*base, "--training.enable_cpu_offload", "true"]), 1)
    model = build_meta_model(streamed.cfg, model_args(streamed.cfg))
    sizes = [m.weight.numel() * BYTES_PER_WEIGHT for _, m in block_linears([model])]
    assert streamed.worst.host[HOST_WEIGHTS] == pytest.approx(sum(sizes), rel=1e-3)
    assert on_device.worst.device[PARAMS] >= sum(sizes)
    saved = on_device.worst.device_peak - streamed.worst.device_peak
    assert saved >= sum(sizes) - max(sizes)


def test_planner_skips_optimizer_variants_that_cannot_save_what_is_missing():
    """A layout traced too big by more than its optimizer variants could save (LoRA's
    adapter states: megabytes) prunes them untraced; a full fine-tune's int8 moments can save
    gigabytes, so a small overshoot keeps them."""
    from titan_lite.estimate.planner import _optimizer_cannot_close

    def variants(method):
        cfg = load_config(["--training.local_batch_size", "2", "--training.seq_len", "128",
                           "--training.global_batch_size", "-1", *(
                               ["--lora.enable", "true"] if method == "lora" else [])])
        on_device = [c for c in _candidates(cfg, 1, "RTX 4090")
                     if not c.cfg.training.enable_cpu_offload
                     and c.cfg.activation_checkpoint.mode == "none"
                     and not c.cfg.lora.embedding_on_host
                     and c.cfg.training.loss_chunks == cfg.training.loss_chunks]
        by_dtype = {c.cfg.optimizer.state_dtype: c for c in on_device}
        return by_dtype["float32"], by_dtype["int8"]

    lora32, lora8 = variants("lora")
    assert _optimizer_cannot_close(lora8, lora32, "device", 0.01, 1)
    full32, full8 = variants("full")
    saving = (full32.state_bytes - full8.state_bytes) / GIB
    assert not _optimizer_cannot_close(full8, full32, "device", saving / 2, 1)
    assert _optimizer_cannot_close(full8, full32, "device", saving * 2, 1)


def test_the_step_in_backward_ranks_ahead_only_for_a_real_gain(repo_cwd):
    """It turns clipping off: the planner sorts it by the ordinary step's time unless it saves
    5% of the step (float32 moments: an 8B full fine-tune's host step at 2 x 2048 with full
    AC, it does; an 8B LoRA's adapters, it does not; int8 moments' host step is so long that
    hiding 2/3 of the compute saves ~1%: ranked for memory, not speed),
    and always shows its own predicted time."""
    def in_backward_variants(flags):
        cfg = load_config(["--config", "train_configs/llama3_8b.toml", "--training.seq_len",
                           "2048", "--training.local_batch_size", "2",
                           "--training.global_batch_size", "-1", *flags])
        return [c for c in _candidates(cfg, 1, "RTX 4090") if c.cfg.optimizer.in_backward]

    small = in_backward_variants(["--lora.enable", "true"])
    float32 = [c for c in small if c.cfg.optimizer.state_dtype == "float32"]
    assert float32 and all(c.rank_seconds > c.step_seconds for c in float32)
    # nor int8 adapter moments, whose slow host step it would hide: ranked by their own
    # ordinary step, behind float32's (so the planner never trades clipping for <1%)
    int8 = [c for c in small if c.cfg.optimizer.state_dtype == "int8"]
    assert int8 and all(c.rank_seconds > c.step_seconds for c in int8)
    assert min(c.rank_seconds for c in int8) > min(c.rank_seconds for c in float32)
    big = [c for c in in_backward_variants([]) if c.cfg.activation_checkpoint.mode == "full"
           and c.cfg.optimizer.state_dtype == "float32"]
    assert big and all(c.rank_seconds == c.step_seconds for c in big)


@pytest.mark.parametrize("ranks, flags", [
    (1, []),
    (2, ["--activation_checkpoint.mode", "full", "--training.enable_cpu_offload", "true",
         "--optimizer.in_backward", "true", "--training.max_norm", "0"]),
    # one shard: the NF4 base streams per use (on the 8B a 2-block trace is 72 MiB off here)
    (1, ["--lora.enable", "true", "--lora.quantize_base", "nf4", "--activation_checkpoint.mode",
         "full", "--training.enable_cpu_offload", "true", "--training.mixed_precision_param",
         "bfloat16"]),
])
def test_the_planners_shallow_traces_extend_to_the_full_peaks(ranks, flags):
    """The planner screens a deep model's layout with traces of 3 and 4 blocks extended to its
    depth (a lower bound by convexity); on the 6 blocks of the debug model, it equals the full
    trace."""
    from titan_lite.estimate.planner import SCREEN_LAYERS, shallow_peaks

    cfg = load_config(["--training.local_batch_size", "2", "--training.seq_len", "64", *flags])
    full = estimate_memory(cfg, ranks).worst
    device, host = shallow_peaks(cfg, ranks, SCREEN_LAYERS[:2])
    assert device * GIB == pytest.approx(full.device_peak, abs=2**20)
    assert host * GIB == pytest.approx(full.host_peak, abs=2**20)
    assert full.device_peak > 0 and (full.host_peak > 0) == ("--training.enable_cpu_offload"
                                                             in flags)


def test_offload_copies_overlap_where_fsdp2_makes_them_asynchronous():
    """FSDP2 copies offloaded weights in its all-gather stream (overlapped with compute) and
    gradients back asynchronously, except when one adds to a gradient already there or a hook
    reads it at once (the step in backward): the cost model counts those as serial, and an
    NF4 base streamed per use on one shard (on the compute stream) too."""
    from titan_lite.estimate.cost import offload_copies

    def copies(*flags, micro_batches=1):
        cfg = load_config(["--training.enable_cpu_offload", "true", *flags])
        return offload_copies(cfg, micro_batches, trainable=1e6, frozen_bytes=3e6, shards=1)

    weights, gradients = 2 * 4e6 + 2 * 3e6, 4e6
    assert copies() == (weights + gradients, 0.0)
    assert copies("--optimizer.in_backward", "true") == (weights, gradients)
    assert copies(micro_batches=2) == (2 * weights + gradients, gradients)
    assert copies("--parallelism.fsdp_reduce_every_microbatch", "false",
                  micro_batches=2) == (2 * weights + gradients, 0.0)
    # full AC recomputes the forward: a third use of each streamed NF4 weight
    streamed = copies("--lora.enable", "true", "--lora.quantize_base", "nf4",
                      "--activation_checkpoint.mode", "full")
    assert streamed == (2 * 4e6 + gradients, (2 + 1) * 3e6)


def test_the_planner_skips_what_shallow_traces_show_too_big(monkeypatch):
    """A deep model's layouts are screened with traces of a few blocks: those too big are
    skipped untraced (logged as such); only the one that fits is traced in full (the `small`
    flavor's 12 blocks, screened at 3, 4 and 5 here; in 1.5 GiB only CPU offload fits)."""
    from titan_lite.estimate import planner

    cfg = load_config(["--model.flavor", "small", "--training.local_batch_size", "1",
                       "--training.seq_len", "64", "--estimate.plan_top", "1"])
    monkeypatch.setattr(planner, "SCREEN_LAYERS", (3, 4, 5))
    lines: list[str] = []
    best = plan(cfg, 1, 1.5, "RTX 4090", lines.append)
    screened = [line for line in lines if "too big for the device by at least" in line]
    assert screened and all("traced with up to 4 blocks" in line for line in screened)
    assert len(lines) == len(screened) + 1 and "fits" in lines[-1]
    assert best[0].cfg.training.enable_cpu_offload and best[0].estimate.required_gib() < 1.5
    # what the screen skipped, every layout without offload, is too big in full too
    frugal = replace(cfg, activation_checkpoint=replace(cfg.activation_checkpoint, mode="full"))
    assert estimate_memory(frugal, 1).required_gib() > 1.5


def test_recomputation_never_speeds_up_the_step_in_backward(repo_cwd):
    """The host step hides behind the backward's wall time, which on a fast GPU is its weight
    copies over PCIe, not its compute: full AC's extra forward cannot hide more of it."""
    from titan_lite.estimate.cost import step_seconds

    def seconds(mode):
        return step_seconds(load_config([
            "--config", "train_configs/llama3_8b.toml", "--training.enable_cpu_offload", "true",
            "--optimizer.in_backward", "true", "--training.max_norm", "0",
            "--activation_checkpoint.mode", mode]), 1, "H100")

    assert seconds("none") <= seconds("selective") <= seconds("full")
