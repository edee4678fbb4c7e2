"""Downloaded Qwen2, Qwen3 and Mistral folders, end to end, with nothing else set: their own
tokenizer.json, Jinja chat template and generation_config.json; LoRA fine-tuning on chat data
in that template; export; `generate --chat` stopping at the template's end of turn. And tensor
parallel, FSDP and pipeline parallel on Qwen2 (q/k/v biases) and Qwen3 (per-head q/k norms)
reproducing one process."""

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
from titan_lite.runtime.distributed import DistEnv, full_tensor
from titan_lite.train import train

transformers = pytest.importorskip("transformers")

# family: (special tokens, id 0 first: the end of a turn; bos; eos; pre-tokenizer; template)
FOLDERS = {
    "qwen2": (["<|im_end|>", "<|endoftext|>", "<|im_start|>"], None, "<|im_end|>",
              "digits+bytelevel", "qwen2_5_instruct"),
    "qwen3": (["<|im_end|>", "<|endoftext|>", "<|im_start|>"], None, "<|im_end|>",
              "digits+bytelevel", "chatml"),
    "mistral": (["</s>", "<unk>", "<s>"], "<s>", "</s>", "metaspace",
                "mistral_7b_instruct_v0_2"),
}
CHATS = [{"messages": [{"role": "user", "content": f"Who begat {name}?"},
                       {"role": "assistant", "content": f"{father} begat {name}."},
                       {"role": "user", "content": "And then?"},
                       {"role": "assistant", "content": f"{name} begat sons and daughters."}]}
         for father, name in [("Adam", "Seth"), ("Seth", "Enos"), ("Enos", "Cainan"),
                              ("Cainan", "Mahalaleel"), ("Mahalaleel", "Jared")]]


@pytest.fixture(scope="module", params=sorted(FOLDERS))
def hub_folder(request, tmp_path_factory):
    """A tiny checkpoint of the family as the hub ships one (tokenizer.json, the template in
    tokenizer_config.json, generation_config.json), whose output layer always answers id 0:
    the end of a turn."""
    family = request.param
    specials, bos, eos, kind, template = FOLDERS[family]
    folder = tmp_path_factory.mktemp(family)
    hf = _hf_tokenizer(specials, kind)
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": bos, "eos_token": eos,
        "chat_template": open(os.path.join(TEMPLATES, f"{template}.jinja")).read()}))
    model = make_hf_model(family, folder, vocab_size=hf.get_vocab_size() + 4,  # (padded)
                          **({"sliding_window": None} if family == "mistral" else {}))  # v0.3
    with torch.no_grad():  # (tied: the embedding is the output layer)
        model.get_output_embeddings().weight.zero_()
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(bos_token_id=hf.token_to_id(bos) if bos else None, eos_token_id=0)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0]}))
    return family, folder


def _job(folder, tmp_path, data: str) -> list[str]:
    return ["--model.flavor", "auto", "--model.init_from", str(folder),
            "--tokenizer.path", str(folder), "--data.format", "chat", "--data.paths", data,
            "--data.cache_dir", str(tmp_path / "cache"), "--lora.enable", "true",
            "--training.seq_len", "128", "--training.steps", "2",
            "--training.local_batch_size", "2", "--checkpoint.enable", "true",
            "--checkpoint.interval", "2", "--job.dump_folder", str(tmp_path / "run"),
            "--metrics.log_freq", "1"]


def test_lora_fine_tune_in_the_checkpoints_template_then_chat(repo_cwd, hub_folder, tmp_path,
                                                              capsys):
    from titan_lite.generate import main as generate_main
    from titan_lite.hf.__main__ import export_checkpoint

    family, folder = hub_folder
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(chat) + "\n" for chat in CHATS))
    job = _job(folder, tmp_path, str(data))
    result = train(load_config(job), CPU_ENV)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    log = capsys.readouterr().out
    assert "chat template: the Jinja template of" in log and "(auto: the checkpoint's own)" in log

    export_checkpoint(["--format", "peft", "--out", str(tmp_path / "peft"), *job])
    adapter = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == os.path.abspath(folder)
    capsys.readouterr()

    generate_main([*job, "--chat", "--prompt", "Who made the light?", "--max_new_tokens", "5",
                   "--temperature", "0"])
    out = capsys.readouterr()
    assert "tokenizer_config.json (chat_template)" in out.err
    assert out.out.strip() == ""  # stopped at the end of the turn, not five of them

    if family == "mistral":  # a record the template refuses: its file, line and message
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                                *CHATS[0]["messages"]]}) + "\n")
        with pytest.raises(ValueError, match=r"bad.jsonl:1: the chat template of .*failed "
                                              r"on this conversation: .*Conversation roles "
                                              r"must alternate"):
            train(load_config(_job(folder, tmp_path / "bad", str(bad))), CPU_ENV)


LAYOUTS = {  # name: overrides (one process: local batch 8 x 64 tokens; the same global batch)
    "one": [],
    "tp2": ["--parallelism.tensor_parallel_degree", "2", "--parallelism.dp_shard", "1"],
    "fsdp2": ["--parallelism.dp_shard", "2", "--training.local_batch_size", "4"],
    "pp2": ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.dp_shard", "1"],
}


def _layout_job(folder: str, dump: str, layout: str) -> list[str]:
    return [*BASE, "--model.flavor", "auto", "--model.init_from", folder, "--tokenizer.path",
            TIKTOKEN_PATH, "--job.dump_folder", dump, *LAYOUTS[layout]]


def _train_each(rank: int, world_size: int, jobs: list[list[str]], out: str) -> None:
    os.chdir(REPO)
    env = DistEnv(rank, rank, world_size, world_size, torch.device("cpu"))
    for index, argv in enumerate(jobs):
        result = train(load_config(argv), env)
        params = {name: full_tensor(p).detach().clone() for part in result.model_parts
                  for name, p in part.named_parameters()}  # (a pipeline stage: its blocks)
        torch.save({"losses": result.losses, "params": params}, f"{out}.{index}.rank{rank}")


@pytest.mark.slow
def test_tp_fsdp_and_pp_on_qwen2_and_qwen3_match_one_process(tmp_path):
    """Qwen2's q/k/v biases and Qwen3's per-head q/k norms (with head size 24, not 64 / 4)
    split, sharded and staged: 2 ranks give one process's losses and final weights."""
    folders = {}
    for family in ("qwen2", "qwen3"):
        folder = tmp_path / family
        model = make_hf_model(family, folder, tie_word_embeddings=False)  # (TP, PP: untied)
        config = json.loads((folder / "config.json").read_text())
        config.update(vocab_size=2304, bos_token_id=None, eos_token_id=None)  # >= 2256 tokens
        model.resize_token_embeddings(2304)
        model.save_pretrained(folder)
        (folder / "config.json").write_text(json.dumps(config))
        folders[family] = str(folder)
    expected = {family: train(load_config(_layout_job(folder, str(tmp_path / f"{family}-one"),
                                                      "one")), CPU_ENV)
                for family, folder in folders.items()}
    runs = [(family, layout) for family in folders for layout in ("tp2", "fsdp2", "pp2")]
    run_distributed(_train_each, 2, [_layout_job(folders[family],
                                                 str(tmp_path / f"{family}-{layout}"), layout)
                                     for family, layout in runs],
                    str(tmp_path / "out"))
    for index, (family, layout) in enumerate(runs):
        ranks = [torch.load(f"{tmp_path / 'out'}.{index}.rank{r}", weights_only=True)
                 for r in range(2)]
        got = {"losses": ranks[0]["losses"], "params": {**ranks[0]["params"],
                                                        **ranks[1]["params"]}}
        reference = expected[family]
        assert_matches(got, {"losses": reference.losses, "params": {
            name: p.detach() for part in reference.model_parts
            for name, p in part.named_parameters()}})
