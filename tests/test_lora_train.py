"""LoRA and QLoRA training: every layout reproduces one process; resume is exact and refuses
another base; checkpoints hold only adapters; exports load in transformers and peft; the
example learns."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import CPU_ENV, REPO, python_env
from layouts import assert_matches, run_layout
from torch.distributed.checkpoint import FileSystemReader

from titan_lite.checkpoint import CheckpointError
from titan_lite.config import load_config
from titan_lite.hf import save_hf
from titan_lite.models.llama3 import FLAVORS, Transformer
from titan_lite.train import train

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("torchao")

LORA = ["--lora.enable", "true", "--lora.rank", "4", "--lora.alpha", "16",
        "--lora.target_modules", "wq,wk,wv,wo,w1,w2,w3,output"]
QLORA = [*LORA, "--lora.quantize_base", "nf4"]


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory):
    return run_layout(tmp_path_factory.mktemp("lora"), "one", 1, *LORA,
                      "--training.local_batch_size", "4")


@pytest.fixture(scope="module")
def qlora_reference(tmp_path_factory):
    return run_layout(tmp_path_factory.mktemp("qlora"), "one", 1, *QLORA,
                      "--training.local_batch_size", "4")


def test_lora_trains_only_adapters(lora_reference):
    params = lora_reference["params"]
    assert params and all(".lora_" in n for n in params)
    assert all(torch.count_nonzero(p) > 0 for n, p in params.items() if ".lora_b" in n)


@pytest.mark.parametrize("name, world, overrides", [
    ("fsdp2", 2, ["--training.local_batch_size", "2"]),
    # (the table kept on host is left out of DDP and FSDP; the loss in slices or in one piece)
    ("ddp2-hostembedding", 2, ["--training.local_batch_size", "2", "--parallelism.dp_replicate",
                               "2", "--parallelism.dp_shard", "1",
                               "--lora.embedding_on_host", "true"]),
    ("fsdp2-offload-fullac-accum2-hostembedding", 2, [
        "--training.local_batch_size", "1", "--training.global_batch_size", "4",
        "--training.enable_cpu_offload", "true", "--activation_checkpoint.mode", "full",
        "--lora.embedding_on_host", "true", "--training.loss_chunks", "4"]),
])
def test_lora_layouts_match_one_process(tmp_path, lora_reference, name, world, overrides):
    assert_matches(run_layout(tmp_path, name, world, *LORA, *overrides), lora_reference)


@pytest.mark.parametrize("name, world, overrides", [
    ("fsdp2", 2, ["--training.local_batch_size", "2"]),
    ("fsdp2-offload-selectiveac", 2, ["--training.local_batch_size", "2",
                                      "--training.enable_cpu_offload", "true",
                                      "--activation_checkpoint.mode", "selective"]),
    # one shard: the NF4 linears stay in host memory and stream to the device per use (in
    # forward, the recomputation and backward)
    ("one-offload-fullac-accum2", 1, ["--training.local_batch_size", "2",
                                      "--training.global_batch_size", "4",
                                      "--training.enable_cpu_offload", "true",
                                      "--activation_checkpoint.mode", "full"]),
])
def test_qlora_layouts_match_one_process(tmp_path, qlora_reference, name, world, overrides):
    assert_matches(run_layout(tmp_path, name, world, *QLORA, *overrides), qlora_reference)


def base_folder(path, seed: int) -> str:
    """A random debug-model base as a Hugging Face folder (what users bring)."""
    args = replace(FLAVORS["debugmodel"], vocab_size=2256, max_seq_len=64)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights(seed)
    save_hf(model.state_dict(), args, str(path))
    return str(path)


def job(tmp_path, base: str, *extra: str) -> list[str]:
    return ["--training.seq_len", "64", "--training.local_batch_size", "2",
            "--training.steps", "4", "--metrics.log_freq", "100", "--metrics.cpu_peak_tflops",
            "1", "--checkpoint.enable", "true", "--checkpoint.interval", "2",
            "--checkpoint.keep_latest_k", "0", "--job.dump_folder", str(tmp_path / "run"),
            "--model.init_from", base, "--lora.base_dtype", "float32", *LORA, *extra]


def test_peft_export_of_adapters_on_a_titan_lite_checkpoint_names_a_base_peft_loads(
        repo_cwd, tmp_path):
    """A base given as a titan_lite checkpoint (e.g. imported from a Hugging Face folder, or
    pretrained here) is no base peft can load: the export refuses without --base, saying what
    to give; with --base the adapter folder loads in peft on its own."""
    hf_base = base_folder(tmp_path / "base", seed=1)
    checkpoint = str(tmp_path / "base_ckpt")
    subprocess.run([sys.executable, "-m", "titan_lite.hf", "import", "--hf", hf_base, "--out",
                    checkpoint], cwd=REPO, env=python_env(), check=True, capture_output=True)
    argv = job(tmp_path, checkpoint, "--training.steps", "2")
    result = train(load_config(argv), CPU_ENV)

    def export(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "titan_lite.hf", "export", *argv,
                               "--format", "peft", "--out", str(tmp_path / "peft"), *extra],
                              cwd=REPO, env=python_env(), capture_output=True, text=True,
                              timeout=120)

    refused = export()
    assert refused.returncode == 2
    assert f"the base is the titan_lite checkpoint {checkpoint}, which peft cannot load: " \
           "give --base" in refused.stderr
    assert export("--base", hf_base).returncode == 0
    on_base = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "peft")).eval()
    tokens = torch.randint(0, 2256, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(on_base(tokens).logits, result.model_parts[0](tokens),
                                   rtol=0, atol=1e-4)


def test_resume_is_exact_holds_only_adapters_refuses_another_base_and_exports(
        repo_cwd, tmp_path):
    base = base_folder(tmp_path / "base", seed=1)
    argv = job(tmp_path, base)
    whole = train(load_config(argv), CPU_ENV)
    folder = tmp_path / "run" / "checkpoint"
    keys = FileSystemReader(str(folder / "step-2")).read_metadata().state_dict_metadata
    assert "model.layers.0.attention.wq.lora_a.weight" in keys
    assert "base.layers.0.attention.wq.weight" in keys  # the fingerprint, not the weight
    assert not any(k.startswith("model.") and ".lora_" not in k for k in keys)

    shutil.rmtree(folder / "step-4")
    resumed = train(load_config(argv), CPU_ENV)
    assert resumed.losses == whole.losses[2:]
    for (name, a), (_, b) in zip(whole.model_parts[0].named_parameters(),
                                 resumed.model_parts[0].named_parameters()):
        assert torch.equal(a, b), name

    tokens = torch.randint(0, 2256, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = resumed.model_parts[0](tokens)
    for fmt in ("merged", "peft"):
        out = tmp_path / fmt
        result = subprocess.run([sys.executable, "-m", "titan_lite.hf", "export", *argv,
                                 "--format", fmt, "--out", str(out)], cwd=REPO,
                                env=python_env(), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    # peft finds the base by itself: adapter_config.json names the Hugging Face folder
    on_base = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "peft")).eval()
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 4
    with torch.no_grad():
        for model in (merged, on_base):
            torch.testing.assert_close(model(tokens).logits, expected, rtol=0, atol=1e-4)

    other = base_folder(tmp_path / "other", seed=2)
    shutil.rmtree(folder / "step-4")
    with pytest.raises(CheckpointError, match="model.init_from: the frozen base"):
        train(load_config(job(tmp_path, other)), CPU_ENV)


def test_lora_example_learns_and_generate_answers_with_its_adapters(tmp_path):
    """train_configs/debug_lora.toml, shortened to 20 steps of 4 samples on 4 validation batches,
    on a random base: validation loss falls and generate answers with the base + the
    checkpoint's adapters."""
    base = base_folder(tmp_path / "base", seed=0)
    argv = ["--config", "train_configs/debug_lora.toml", "--model.init_from", base,
            "--job.dump_folder", str(tmp_path / "run"), "--training.steps", "20",
            "--validation.interval", "20", "--validation.steps", "4",
            "--validation.sample_prompts", "", "--training.local_batch_size", "4"]
    env = python_env()
    result = subprocess.run(["bash", "run_train.sh", *argv], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "trainable: " in out and "frozen base: " in out
    losses = [float(line.split("val_loss")[1].split()[0]) for line in out.splitlines()
              if "val_loss" in line]
    assert len(losses) == 2 and losses[-1] < 0.25 * losses[0], losses
    answer = subprocess.run(
        [sys.executable, "-m", "titan_lite.generate", *argv, "--chat", "--prompt",
         "Does this verse speak of the LORD?\n\nThe LORD is a man of war."],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert answer.stdout.strip() in ("Yes.", "No.")
    assert os.path.isdir(tmp_path / "run" / "checkpoint" / "step-20")


@pytest.mark.four_ranks
def test_lora_hsdp_matches_one_process(tmp_path, lora_reference):
    assert_matches(run_layout(tmp_path, "hsdp", 4, *LORA, "--training.local_batch_size", "1",
                              "--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "2"),
                   lora_reference)
