"""A downloaded Qwen-style folder, end to end, with nothing else set: its own tokenizer.json,
Jinja chat template and generation_config.json; LoRA fine-tuning on instruction data in that
template; export; `generate --chat` stopping at the template's end of turn. And tensor
parallel on Qwen2 (q/k/v biases) and Qwen3 (per-head q/k norms) reproducing one process."""

import json
import os

import pytest
import torch
from conftest import CPU_ENV, REPO, TIKTOKEN_PATH
from dist_helpers import run_distributed
from layouts import BASE, assert_matches
from test_families import make_hf_model
from test_jinja_templates import TEMPLATES, _hf_tokenizer

from titan_lite.config import load_config
from titan_lite.distributed import DistEnv, full_tensor
from titan_lite.train import train

transformers = pytest.importorskip("transformers")

SPECIALS = ["<|im_end|>", "<|endoftext|>", "<|im_start|>"]  # <|im_end|> is id 0


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    """A tiny Qwen2 checkpoint as the hub ships one, whose output layer always answers id 0:
    <|im_end|>, the end of a turn."""
    folder = tmp_path_factory.mktemp("qwen2")
    hf = _hf_tokenizer(SPECIALS, "digits+bytelevel")
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": open(os.path.join(TEMPLATES, "qwen2_5_instruct.jinja")).read()}))
    model = make_hf_model("qwen2", folder, vocab_size=hf.get_vocab_size() + 4)  # (padded)
    with torch.no_grad():  # tied: the embedding is the output layer
        model.model.embed_tokens.weight.zero_()
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(vocab_size=model.config.vocab_size, bos_token_id=None, eos_token_id=0)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 1]}))
    return folder


def test_lora_fine_tune_in_the_checkpoints_template_then_chat(repo_cwd, qwen_folder, tmp_path,
                                                              capsys):
    from titan_lite.generate import main as generate_main
    from titan_lite.hf import export_checkpoint

    job = ["--model.flavor", "auto", "--model.init_from", str(qwen_folder),
           "--tokenizer.path", str(qwen_folder), "--data.format", "alpaca",
           "--data.paths", "titan_lite/assets/data/kjv_sft.jsonl", "--data.cache_dir",
           str(tmp_path / "cache"), "--lora.enable", "true", "--training.seq_len", "128",
           "--training.steps", "2", "--training.local_batch_size", "2",
           "--checkpoint.enable", "true", "--checkpoint.interval", "2",
           "--job.dump_folder", str(tmp_path / "run"), "--metrics.log_freq", "1"]
    result = train(load_config(job), CPU_ENV)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    log = capsys.readouterr().out
    assert "chat template: the Jinja template of" in log and "(auto: the checkpoint's own)" in log

    export_checkpoint(["--format", "peft", "--out", str(tmp_path / "peft"), *job])
    adapter = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == os.path.abspath(qwen_folder)
    capsys.readouterr()

    generate_main([*job, "--chat", "--prompt", "Who made the light?", "--max_new_tokens", "5",
                   "--temperature", "0"])
    out = capsys.readouterr()
    assert "tokenizer_config.json (chat_template)" in out.err
    assert out.out.strip() == ""  # stopped at <|im_end|>, not five of them


def _tp_job(folder: str, dump: str, tp: int) -> list[str]:
    return [*BASE, "--model.flavor", "auto", "--model.init_from", folder, "--tokenizer.path",
            TIKTOKEN_PATH, "--job.dump_folder", dump,
            "--parallelism.tensor_parallel_degree", str(tp), "--parallelism.dp_shard", "1"]


def _train_each(rank: int, world_size: int, jobs: list[list[str]], out: str) -> None:
    os.chdir(REPO)
    env = DistEnv(rank, rank, world_size, world_size, torch.device("cpu"))
    for index, argv in enumerate(jobs):
        result = train(load_config(argv), env)
        params = {name: full_tensor(p).detach().clone() for part in result.model_parts
                  for name, p in part.named_parameters()}
        if rank == 0:
            torch.save({"losses": result.losses, "params": params}, f"{out}.{index}")


@pytest.mark.slow
def test_tensor_parallel_on_qwen2_and_qwen3_matches_one_process(tmp_path):
    folders = []
    for family in ("qwen2", "qwen3"):
        folder = tmp_path / family
        model = make_hf_model(family, folder, tie_word_embeddings=False)  # (TP: untied)
        config = json.loads((folder / "config.json").read_text())
        config.update(vocab_size=2304, bos_token_id=None, eos_token_id=None)  # >= 2256 tokens
        (folder / "config.json").write_text(json.dumps(config))
        model.resize_token_embeddings(2304)
        model.save_pretrained(folder)
        (folder / "config.json").write_text(json.dumps(config))
        folders.append(str(folder))
    one = [_tp_job(f, str(tmp_path / f"one{i}"), 1) for i, f in enumerate(folders)]
    expected = [train(load_config(argv), CPU_ENV) for argv in one]
    two = [_tp_job(f, str(tmp_path / f"tp{i}"), 2) for i, f in enumerate(folders)]
    run_distributed(_train_each, 2, two, str(tmp_path / "tp"))
    for index, reference in enumerate(expected):
        got = torch.load(f"{tmp_path / 'tp'}.{index}", weights_only=True)
        assert_matches(got, {"losses": reference.losses, "params": {
            name: p.detach() for part in reference.model_parts
            for name, p in part.named_parameters()}})
