import dataclasses
import subprocess
import sys

import pytest
from conftest import REPO, python_env

from titan_lite.build import check_job, checks
from titan_lite.config import ConfigError, JobConfig, help_text, load_config
from titan_lite.parallel.dims import resolve_degrees

DEBUG = "train_configs/debug_model.toml"


def problems_of(argv: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(argv)
    return err.value.problems


def write(tmp_path, text: str) -> str:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return str(path)


def test_every_shipped_config_loads_and_passes_checks(repo_cwd):
    import glob

    for path in sorted(glob.glob("train_configs/*.toml")):
        cfg = load_config(["--config", path])
        assert isinstance(cfg, JobConfig)
    assert check_job(load_config(["--config", DEBUG]), world_size=1) == []


def test_round_trip_through_toml(repo_cwd, tmp_path):
    cfg = load_config(["--config", DEBUG, "--training.steps", "7", "--data.paths", "a,b"])
    again = load_config(["--config", write(tmp_path, cfg.to_toml())])
    assert again == cfg


def test_overrides_coerce_types(repo_cwd):
    cfg = load_config(["--config", DEBUG, "--training.steps", "20", "--optimizer.lr=3e-4",
                       "--data.shuffle", "false", "--job.deterministic",
                       "--data.paths", "x.txt, y.jsonl", "--job.description", "42"])
    assert cfg.training.steps == 20 and cfg.optimizer.lr == 3e-4
    assert cfg.data.shuffle is False and cfg.job.deterministic is True
    assert cfg.data.paths == ["x.txt", "y.jsonl"] and cfg.job.description == "42"


def test_toml_int_is_accepted_for_float_but_bool_is_not_an_int(tmp_path):
    cfg = load_config(["--config", write(tmp_path, "[optimizer]\nlr = 1\n")])
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    problems = problems_of(["--config", write(tmp_path, "[training]\nsteps = true\n")])
    assert problems == [f"{tmp_path}/job.toml: [training] steps: expected integer, got True"]


def test_all_problems_are_reported_at_once_with_suggestions(tmp_path):
    path = write(tmp_path, "[trainig]\nsteps = 3\n[training]\nstpes = 3\nseq_len = 'long'\n"
                           "local_batch_size = 0\n[model]\nflavor = '8b'\n")
    problems = problems_of(["--config", path, "--optimizer.lr", "fast", "--metrics.log_freqq",
                            "2", "stray"])
    assert len(problems) == 8, problems
    text = "\n".join(problems)
    assert "unexpected argument 'stray'" in text
    assert "unknown section 'trainig' (did you mean 'training'?)" in text
    assert "unknown key 'stpes' in section [training] (did you mean 'steps'?)" in text
    assert "[training] seq_len: expected integer, got 'long'" in text
    assert "[training] local_batch_size: 0 is below the minimum 1" in text
    assert "[model] flavor: '8b' is not one of" in text and "did you mean '8B'" in text
    assert "--optimizer.lr: expected number, got 'fast'" in text
    assert "unknown key 'log_freqq' in section [metrics] (did you mean 'log_freq'?)" in text
    assert all(line.startswith((path, "--", "command line")) for line in problems)


def test_missing_and_malformed_files(tmp_path):
    assert problems_of(["--config", str(tmp_path / "nope.toml")]) == [
        f"{tmp_path}/nope.toml: config file not found"]
    bad = write(tmp_path, "[training\nsteps = 3\n")
    assert "invalid TOML" in problems_of(["--config", bad])[0]
    assert "must be a [section] table" in problems_of(["--config", write(tmp_path, "x = 1\n")])[0]


@pytest.mark.parametrize("overrides, world, message", [
    (["--parallelism.tensor_parallel_degree", "3"], 3,
     "parallelism.tensor_parallel_degree: 3 does not divide the model's n_heads (16)"),
    (["--parallelism.tensor_parallel_degree", "2", "--model.flavor", "3B"], 2,
     "tied input/output embeddings (1B, 3B) are not supported with tensor parallel"),
    (["--parallelism.pipeline_parallel_degree", "2",
      "--parallelism.pipeline_parallel_layers_per_stage", "4"], 2,
     "pipeline_parallel_layers_per_stage: 4 does not divide the model's 6 layers"),
    (["--parallelism.pipeline_parallel_degree", "2",
      "--parallelism.pipeline_parallel_layers_per_stage", "1",
      "--parallelism.pipeline_parallel_schedule", "GPipe"], 2,
     "GPipe runs one stage per rank, but the split gives 6 stages for 2 ranks"),
    (["--parallelism.pipeline_parallel_degree", "4",
      "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B"], 4,
     "8 stages need at least 8 layers; the model has 6"),
    (["--parallelism.pipeline_parallel_degree", "4",
      "--parallelism.pipeline_parallel_split_points", "layers.2"], 4,
     "2 stages cannot be spread evenly over 4 pipeline ranks"),
    (["--parallelism.pipeline_parallel_degree", "2",
      "--parallelism.pipeline_parallel_split_points", "layers.4,layers.3"], 2,
     "'layers.3' is not a block 'layers.<i>' with 0 < i < 6, after the previous split point"),
    (["--parallelism.pipeline_parallel_degree", "2",
      "--parallelism.pipeline_parallel_microbatch_size", "3"], 2,
     "pipeline_parallel_microbatch_size: 3 does not divide training.local_batch_size (8)"),
    (["--parallelism.pipeline_parallel_degree", "2", "--training.global_batch_size", "16"], 2,
     "gradient accumulation is not supported with pipeline parallel"),
    (["--training.loss_chunks", "129", "--training.seq_len", "16"], 1,
     "training.loss_chunks: 129 slices for 128 tokens per micro-batch"),
    (["--data.weights", "1,2"], 1,
     "data.weights: 2 weight(s) for 1 data.paths: give one positive weight per path"),
    (["--data.weights", "0"], 1, "give one positive weight per path"),
    (["--data.weights", "1", "--validation.split", "0.1"], 1,
     "validation.split: not with data.weights (a mixture)"),
    (["--parallelism.pipeline_parallel_degree", "2", "--training.loss_chunks", "20",
      "--training.seq_len", "16"], 2,
     "training.loss_chunks: 20 slices for 16 tokens per micro-batch"),
    (["--parallelism.pipeline_parallel_degree", "2", "--model.flavor", "1B"], 2,
     "tied input/output embeddings (1B, 3B) cannot be split across pipeline stages"),
    (["--optimizer.in_backward", "true", "--training.max_norm", "0"], 1,
     "optimizer.in_backward: steps on the host as gradients reach it; set "
     "training.enable_cpu_offload = true"),
    (["--optimizer.in_backward", "true", "--training.enable_cpu_offload", "true"], 1,
     "optimizer.in_backward: each unit steps before the global gradient norm exists"),
    (["--optimizer.in_backward", "true", "--training.enable_cpu_offload", "true",
      "--training.max_norm", "0", "--parallelism.pipeline_parallel_degree", "2"], 2,
     "optimizer.in_backward: not with pipeline or tensor parallel"),
    (["--optimizer.state_dtype", "int8", "--parallelism.tensor_parallel_degree", "2"], 2,
     "optimizer.state_dtype: 'int8' not with tensor parallel"),
])
def test_tp_and_pp_layouts_are_checked(repo_cwd, overrides, world, message):
    problems = check_job(load_config(["--config", DEBUG, *overrides]), world_size=world)
    assert any(message in p for p in problems), problems


def test_cross_key_checks(repo_cwd):
    cfg = load_config(["--config", DEBUG, "--training.global_batch_size", "12",
                       "--activation_checkpoint.selective_ac_option", "-2",
                       "--training.mixed_precision_reduce", "bfloat16",
                       "--checkpoint.load_step", "0", "--tokenizer.path", "missing.model"])
    problems = "\n".join(check_job(cfg, world_size=2))
    assert "global_batch_size: 12 is not a multiple of local_batch_size x data-parallel " \
           "degree (8 x 2 = 16)" in problems
    assert "selective_ac_option: '-2' is neither 'op' nor a positive integer" in problems
    assert "training.mixed_precision_reduce: only FSDP reduces in another dtype" not in problems
    one_rank = "\n".join(check_job(cfg, world_size=1))  # no sharding, no offload: no FSDP
    assert "training.mixed_precision_reduce: only FSDP reduces in another dtype" in one_rank
    assert "checkpoint.load_step: 0 is not a step" in problems
    assert "tokenizer.path: 'missing.model' does not exist" in problems


@pytest.mark.parametrize("overrides, world, message", [
    ({"dp_replicate": 2, "dp_shard": 1}, 3, "the degrees multiply to 2 but the world size is 3"),
    ({"dp_replicate": -1, "dp_shard": -1}, 2, "only one degree may be -1"),
    ({"tensor_parallel_degree": 2}, 3, "not divisible"),
    ({"dp_replicate": 0}, 1, "parallelism.dp_replicate: 0 is not a degree"),
    ({"dp_shard": 3}, 2, "the degrees multiply to 3 but the world size is 2"),
    ({"dp_shard": -2}, 2, "parallelism.dp_shard: -2 is not a degree"),
    ({"tensor_parallel_degree": 2, "pipeline_parallel_degree": 2}, 2,
     "world size 2 is not divisible by the product of the fixed degrees (4)"),
])
def test_bad_degrees_are_refused(overrides, world, message):
    cfg = dataclasses.replace(JobConfig().parallelism, **overrides)
    dims, problems = resolve_degrees(cfg, world)
    assert dims is None and any(message in p for p in problems), problems


def test_minus_one_takes_the_rest_of_the_world():
    dims, problems = resolve_degrees(JobConfig().parallelism, 4)  # default: dp_shard = -1
    assert problems == [] and dims.dp_shard == 4 and dims.dp == 4 and dims.world_size == 4
    hsdp = dataclasses.replace(JobConfig().parallelism, dp_replicate=2)
    dims, problems = resolve_degrees(hsdp, 4)
    assert problems == [] and (dims.dp_replicate, dims.dp_shard, dims.dp) == (2, 2, 4)


def test_help_lists_every_key_with_default():
    text = help_text()
    for section in dataclasses.fields(JobConfig):
        for f in dataclasses.fields(section.default_factory()):
            assert f"--{section.name}.{f.name} (" in text
            assert f.metadata["help"] in text
    assert "--training.steps (integer, default 10)" in text


def test_cli_exits_2_with_one_line_per_problem_and_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "titan_lite.train", "--config", DEBUG, "--training.stepz", "3",
         "--optimizer.lr", "abc"], cwd=REPO, env=python_env(), capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == ["config error: --training.stepz: unknown key 'stepz' in section [training] "
                     "(did you mean 'steps'?)",
                     "config error: --optimizer.lr: expected number, got 'abc'"]


def test_cli_help_exits_0():
    result = subprocess.run([sys.executable, "-m", "titan_lite.train", "--help"], cwd=REPO,
                            env=python_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--training.seq_len" in result.stdout


def test_bfloat16_on_a_gpu_without_it_is_refused_with_the_float16_advice(repo_cwd,
                                                                         monkeypatch):
    monkeypatch.setattr(checks, "_cuda_available", lambda: True)
    monkeypatch.setattr(checks, "_cuda_has_bfloat16", lambda: False)  # a V100 or T4
    bf16 = load_config(["--config", DEBUG, "--training.mixed_precision_param", "bfloat16"])
    assert ("training.mixed_precision_param: this GPU has no bfloat16 (pre-Ampere: V100, T4, "
            "RTX 20xx); use 'float16', which adds loss scaling") in check_job(bf16, 1)
    fp16 = load_config(["--config", DEBUG, "--training.mixed_precision_param", "float16"])
    assert not any("mixed_precision_param" in p for p in check_job(fp16, 1))


def test_tensorboard_without_the_package_is_refused(repo_cwd):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    cfg = load_config(["--config", DEBUG, "--metrics.enable_tensorboard"])
    assert any("tensorboard package is not installed" in p for p in check_job(cfg, 1))
