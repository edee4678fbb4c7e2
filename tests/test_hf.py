"""Hugging Face interop: import a transformers Llama, match its logits, export, load it back."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import CPU_ENV, REPO, python_env
from dist_helpers import run_distributed

from titan_lite.config import Parallelism, Training, load_config
from titan_lite.hf import (
    args_from_hf_config,
    from_hf_rows,
    load_hf_weights,
    save_hf,
    to_hf_rows,
)
from titan_lite.models.llama3 import Transformer
from titan_lite.parallel.dims import ParallelDims, build_mesh
from titan_lite.parallel.fsdp import apply_fsdp
from titan_lite.parallel.tp import apply_tp
from titan_lite.build import load_pretrained
from titan_lite.train import train

transformers = pytest.importorskip("transformers")

# Logits of two fp32 implementations of the same network (different op order, e.g. HF's
# half-split RoPE vs. complex multiplication here): ~1e-6 seen; 1e-4 leaves room.
LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny random Llama 3.1-style model (GQA 4:1, llama3 RoPE scaling), in 3+ shards; its
    one kv head of 16 rows splits mid-head over 2 FSDP ranks."""
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, vocab_size=101, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("hf")
    model.save_pretrained(folder, max_shard_size="40KB")
    return folder


def hf_logits(folder, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def load(folder) -> Transformer:
    args = args_from_hf_config(str(folder))
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights()
    load_hf_weights([model], str(folder), args)
    return model


TOKENS = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))


def test_rope_row_permutation_round_trips():
    rows = torch.arange(4 * 8 * 3, dtype=torch.float32).view(32, 3)
    assert not torch.equal(to_hf_rows(rows, 4), rows)
    assert torch.equal(from_hf_rows(to_hf_rows(rows, 4), 4), rows)


def test_config_is_read(hf_folder):
    args = args_from_hf_config(str(hf_folder))
    assert (args.dim, args.n_layers, args.n_heads, args.kv_heads, args.ffn_hidden_dim,
            args.vocab_size) == (64, 2, 4, 1, 96, 101)
    assert args.rope_scaling.original_max_position_embeddings == 32
    assert len(json.load(open(hf_folder / "model.safetensors.index.json"))["weight_map"]) > 0


def test_imported_model_gives_hf_logits(hf_folder):
    model = load(hf_folder)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), hf_logits(hf_folder, TOKENS), rtol=0,
                                   atol=LOGITS_ATOL)


def test_exported_model_loads_in_transformers_with_the_same_logits(hf_folder, tmp_path):
    model = load(hf_folder)
    out = tmp_path / "export"
    save_hf(model.state_dict(), model.args, str(out), max_shard_bytes=30_000)
    assert len({f for f in json.load(open(out / "model.safetensors.index.json"))[
        "weight_map"].values()}) > 1  # really sharded
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(out, TOKENS), model(TOKENS), rtol=0,
                                   atol=LOGITS_ATOL)


def _sharded_import(rank: int, world_size: int, folder: str) -> None:
    reference = load(folder)
    args = reference.args
    for layout in ("fsdp", "tp"):
        with torch.device("meta"):
            model = Transformer(args)
        if layout == "fsdp":
            mesh = build_mesh(ParallelDims(1, world_size, 1, 1), "cpu", fsdp=True)
            apply_fsdp(model, mesh, Training(), Parallelism())
        else:
            mesh = build_mesh(ParallelDims(1, 1, world_size, 1), "cpu", fsdp=False)
            apply_tp(model, mesh["tp"], loss_parallel=False)
        model.to_empty(device="cpu")
        load_hf_weights([model], folder, args)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert torch.equal(p.full_tensor(), q.detach()), f"{layout}: {name}"


@pytest.mark.slow
def test_sharded_import_reads_each_ranks_shard_into_fsdp_and_tp(hf_folder):
    run_distributed(_sharded_import, 2, str(hf_folder))


def test_training_starts_from_hf_weights(repo_cwd, tmp_path):
    """Export a debug model drawn with seed 7, then train from it with seed 0: the first loss is
    that of training from seed 7 (same weights, same unshuffled data)."""
    common = ["--training.seq_len", "32", "--training.local_batch_size", "2",
              "--training.steps", "1", "--data.shuffle", "false", "--metrics.cpu_peak_tflops",
              "1", "--job.dump_folder", str(tmp_path / "run")]
    from_seed_7 = train(load_config([*common, "--job.seed", "7"]), CPU_ENV)
    folder = tmp_path / "hf"
    args = from_seed_7.model_parts[0].args
    with torch.device("meta"):
        fresh = Transformer(args)
    fresh.to_empty(device="cpu")
    fresh.init_weights(seed=7)
    save_hf(fresh.state_dict(), args, str(folder))
    imported = train(load_config([*common, "--model.init_from", str(folder)]), CPU_ENV)
    assert imported.losses == from_seed_7.losses


def test_init_from_a_different_architecture_is_refused(repo_cwd, hf_folder, tmp_path):
    cfg = load_config(["--model.init_from", str(hf_folder), "--training.seq_len", "32",
                       "--job.dump_folder", str(tmp_path)])
    with pytest.raises(ValueError, match=r"model.init_from: .* is not this model: dim 64 "
                                         r"\(expected 256\); n_layers 2 \(expected 6\)"):
        train(cfg, CPU_ENV)


def test_a_training_checkpoint_exports_to_transformers(repo_cwd, tmp_path):
    """Train 2 steps with checkpoints, export the newest with the CLI, compare logits."""
    job = ["--training.seq_len", "32", "--training.local_batch_size", "2", "--training.steps",
           "2", "--metrics.cpu_peak_tflops", "1", "--checkpoint.enable", "true",
           "--job.dump_folder", str(tmp_path / "run")]
    trained = train(load_config(job), CPU_ENV).model_parts[0]
    result = subprocess.run([sys.executable, "-m", "titan_lite.hf", "export", *job, "--out",
                             str(tmp_path / "hf")], cwd=REPO, env=python_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote" in result.stdout and "step-2" in result.stdout
    tokens = torch.randint(0, trained.args.vocab_size, (2, 32),
                           generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(tmp_path / "hf", tokens), trained(tokens),
                                   rtol=0, atol=LOGITS_ATOL)


def pretrained(folder, args) -> Transformer:
    """A model of ``args`` drawn at random, then overwritten as ``--model.init_from`` does."""
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights(seed=123)
    load_pretrained([model], str(folder), args)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cli_import_writes_a_checkpoint_init_from_loads(hf_folder, tmp_path, dtype):
    """HF folder -> `python -m titan_lite.hf import` -> DCP checkpoint in the stored dtype ->
    the same weights as reading the HF folder directly (bf16 cast up on load)."""
    source = hf_folder
    if dtype == torch.bfloat16:
        source = tmp_path / "hf_bf16"
        transformers.LlamaForCausalLM.from_pretrained(hf_folder, dtype=dtype).save_pretrained(
            source)
    out = tmp_path / "imported"
    result = subprocess.run([sys.executable, "-m", "titan_lite.hf", "import", "--hf",
                             str(source), "--out", str(out)], cwd=REPO, env=python_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "config.json").exists() and not (tmp_path / "imported.partial").exists()
    args = args_from_hf_config(str(source))
    direct, converted = pretrained(source, args), pretrained(out, args)
    for (name, a), b in zip(direct.state_dict().items(), converted.state_dict().values()):
        assert b.dtype == torch.float32 and torch.equal(a, b), name
    torch.testing.assert_close(converted(TOKENS), load(hf_folder)(TOKENS),
                               rtol=0, atol=0.05 if dtype == torch.bfloat16 else 0)


def test_cli_import_of_a_folder_that_is_not_a_llama_exits_2(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = subprocess.run([sys.executable, "-m", "titan_lite.hf", "import", "--hf",
                             str(tmp_path), "--out", str(tmp_path / "out")], cwd=REPO,
                            env=python_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert (f"error: cannot import {tmp_path}: {tmp_path}/config.json: no 'hidden_size'"
            in result.stderr)
    assert not (tmp_path / "out").exists()


def test_init_from_a_training_checkpoint_loads_its_weights(repo_cwd, tmp_path):
    """Warm start from another run's step-N (weights only): exactly the trained weights."""
    job = ["--training.seq_len", "32", "--training.local_batch_size", "2", "--training.steps",
           "2", "--metrics.cpu_peak_tflops", "1", "--checkpoint.enable", "true",
           "--job.dump_folder", str(tmp_path / "run")]
    trained = train(load_config(job), CPU_ENV).model_parts[0]
    warm = pretrained(tmp_path / "run" / "checkpoint" / "step-2", trained.args)
    for (name, a), b in zip(trained.state_dict().items(), warm.state_dict().values()):
        assert torch.equal(a, b), name
