"""Any Llama checkpoint a user brings: Llama 2 shapes, ``model.flavor = "auto"`` from a tiny
random transformers model's config.json, its tokenizer found in the folder, and the refusals."""

import json
import re
import shutil

import pytest
import torch
from conftest import CPU_ENV, SPM_PATH, TIKTOKEN_PATH

from titan_lite.build import load_pretrained
from titan_lite.build import check_job, parse_or_exit
from titan_lite.config import load_config
from titan_lite.estimate.report import main as estimate_main
from titan_lite.inference.model import weights_folder
from titan_lite.estimate.trace import estimate_memory
from titan_lite.hf import save_hf
from titan_lite.hf.config import job_model_args
from titan_lite.models.llama3 import Transformer
from titan_lite.data.tokenizer import build_tokenizer
from titan_lite.train import train

transformers = pytest.importorskip("transformers")

LOGITS_ATOL = 1e-4  # as test_hf: two fp32 implementations, ~1e-6 seen
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
TIKTOKEN_IDS = {"bos_token_id": 2000, "eos_token_id": 2001}  # the test tokenizer's
# Shapes `auto` must read: GQA ratios 1, 2, 4 and MQA; odd vocab and FFN widths, tied and
# untied, RoPE theta 10,000 / 500,000, Llama 3.1 scaling.
SHAPES = {
    "mha-tied-odd": dict(hidden_size=64, intermediate_size=100, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=2261, tie_word_embeddings=True),
    "gqa2-llama31-rope": dict(hidden_size=64, intermediate_size=88, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=2304, rope_theta=500000.0,
                              rope_scaling=LLAMA3_SCALING),
    "gqa4": dict(hidden_size=64, intermediate_size=136, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=2256),
    "mqa-head-dim-12": dict(hidden_size=48, intermediate_size=130, num_attention_heads=4,
                            num_key_value_heads=1, vocab_size=2257, rope_theta=500000.0),
}


def hf_model_folder(folder, tokenizer: str = TIKTOKEN_PATH, **config) -> str:
    """A tiny random LlamaForCausalLM saved as a Hugging Face folder, with a tokenizer file in
    the place a real folder keeps it."""
    defaults = dict(num_hidden_layers=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                    rope_theta=10000.0, **TIKTOKEN_IDS)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**defaults, **config}))
    model.save_pretrained(folder)
    where = "original/tokenizer.model" if tokenizer == TIKTOKEN_PATH else "tokenizer.model"
    (folder / where).parent.mkdir(exist_ok=True)
    shutil.copy(tokenizer, folder / where)
    return str(folder)


def hf_logits(folder, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def imported(folder: str) -> Transformer:
    """The folder's model built as a job with flavor auto builds it, with its weights."""
    args = job_model_args("auto", folder, 64, build_tokenizer("auto", folder))
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights()
    load_pretrained([model], folder, args)
    return model


def assert_hf_logits(folder, model: Transformer) -> None:
    tokens = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_logits(folder, tokens), rtol=0,
                                   atol=LOGITS_ATOL)


@pytest.mark.parametrize("tied", [False, True])
def test_llama2_shaped_model_imports_and_exports_with_transformers_logits(tmp_path, tied):
    """Multi-head attention, theta 10,000, no RoPE scaling, a sentencepiece tokenizer."""
    folder = hf_model_folder(tmp_path / "hf", SPM_PATH, hidden_size=64, intermediate_size=172,
                             num_attention_heads=4, num_key_value_heads=4, vocab_size=2000,
                             bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied)
    model = imported(folder)
    assert (model.args.kv_heads, model.args.rope_theta, model.args.rope_scaling,
            model.args.tie_word_embeddings) == (4, 10000.0, None, tied)
    assert_hf_logits(folder, model)
    save_hf(model.state_dict(), model.args, str(tmp_path / "export"))
    assert_hf_logits(tmp_path / "export", model)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_flavor_auto_trains_a_step_and_exports_with_equal_logits(repo_cwd, tmp_path, shape):
    folder = hf_model_folder(tmp_path / "hf", **SHAPES[shape])
    assert_hf_logits(folder, imported(folder))
    cfg = load_config(["--model.flavor", "auto", "--model.init_from", folder,
                       "--tokenizer.path", folder, "--training.seq_len", "32",
                       "--training.local_batch_size", "2", "--training.steps", "1",
                       "--metrics.cpu_peak_tflops", "1", "--data.cache_dir",
                       str(tmp_path / "cache"), "--job.dump_folder", str(tmp_path / "run")])
    assert check_job(cfg, world_size=1) == []
    result = train(cfg, CPU_ENV)
    model = result.model_parts[0]
    assert model.args.vocab_size == SHAPES[shape]["vocab_size"]  # the checkpoint's, padded
    assert torch.isfinite(torch.tensor(result.losses)).all()
    save_hf({k: v.detach() for k, v in model.state_dict().items()}, model.args,
            str(tmp_path / "export"))
    assert_hf_logits(tmp_path / "export", model)


def test_estimator_takes_the_architecture_from_config_json(repo_cwd, tmp_path, capsys):
    """"Will it fit" for the user's own model: only its config.json is needed."""
    folder = tmp_path / "own"
    folder.mkdir()
    config = transformers.LlamaConfig(num_hidden_layers=2, **SHAPES["gqa2-llama31-rope"],
                                      **TIKTOKEN_IDS)
    (folder / "config.json").write_text(config.to_json_string())
    expected = transformers.LlamaForCausalLM(config).num_parameters()
    cfg = load_config(["--model.flavor", "auto", "--model.init_from", str(folder),
                       "--training.seq_len", "32", "--training.local_batch_size", "1",
                       "--tokenizer.path", str(tmp_path / "absent")])
    assert check_job(cfg, world_size=1, training_here=False) == []
    assert estimate_memory(cfg, 1).num_params == expected
    with pytest.raises(SystemExit) as exit_:  # a tokenizer that is not this model's: one line
        estimate_main(["--model.flavor", "auto", "--model.init_from", str(folder),
                       "--tokenizer.path", SPM_PATH])
    assert exit_.value.code == 2
    assert f"error: {folder}/config.json: bos_token_id 2000 but the tokenizer" in (
        capsys.readouterr().err)


def config_error(monkeypatch, capsys, argv: list[str]) -> str:
    """The one line parse_or_exit prints for ``argv``, and that it exits 2."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit) as exit_:
        parse_or_exit(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("edit, expected", [
    ({"attention_bias": True}, r"config.json: attention_bias true: a bias on the attention "
                               r"output projection"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 64},
     r"config.json: sliding_window 64: training.seq_len \d+ is longer"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     r"config.json: rope_parameters type 'yarn'"),  # as transformers >= 5 writes it
    ({"rope_scaling": {"type": "linear", "factor": 2.0}},
     r"config.json: rope_scaling type 'linear'"),  # as older versions wrote it
    ({"architectures": ["LlamaForSequenceClassification"]}, r"config.json: architectures"),
    ({"mlp_bias": True}, r"config.json: mlp_bias true: biases in the MLP"),
    ({"qk_norm": True}, r"config.json: qk_norm true: norms on q and k"),
    ({"hidden_act": "gelu"}, r"config.json: hidden_act 'gelu'"),
    ({"quantization_config": {"quant_method": "gptq"}}, r"config.json: quantization_config"),
    ({"model_type": "gemma"}, r"config.json: model_type 'gemma': supported are"),
])
def test_a_config_json_this_model_cannot_represent_is_refused(repo_cwd, tmp_path, monkeypatch,
                                                               capsys, edit, expected):
    folder = tmp_path / "other"
    folder.mkdir()
    config = json.loads(transformers.LlamaConfig(**SHAPES["gqa4"]).to_json_string())
    (folder / "config.json").write_text(json.dumps({**config, **edit}))
    for flavor in ("auto", "debugmodel"):  # a named flavor is checked against it too
        line = config_error(monkeypatch, capsys, ["--model.flavor", flavor,
                                                  "--model.init_from", str(folder)])
        assert line.startswith(f"config error: model.init_from: {folder}/config.json")
        assert re.search(expected, line), line


def test_auto_without_a_config_json_and_a_folder_without_tokenizer_are_refused(
        repo_cwd, tmp_path, monkeypatch, capsys):
    assert "model.flavor: 'auto' takes the architecture from model.init_from" in config_error(
        monkeypatch, capsys, ["--model.flavor", "auto"])
    (tmp_path / ".metadata").write_text("")  # a titan_lite training checkpoint has no config
    assert f"model.flavor: 'auto' needs {tmp_path}/config.json" in config_error(
        monkeypatch, capsys, ["--model.flavor", "auto", "--model.init_from", str(tmp_path)])
    assert f"tokenizer.path: {tmp_path} has no tokenizer" in config_error(
        monkeypatch, capsys, ["--tokenizer.path", str(tmp_path)])


def test_a_folder_that_is_neither_hf_nor_a_checkpoint_is_refused(repo_cwd, tmp_path,
                                                                  monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = config_error(monkeypatch, capsys, ["--model.init_from", str(empty)])
    assert f"model.init_from: {str(empty)!r} is neither a Hugging Face folder" in line, line
    cfg = load_config(["--checkpoint.folder", str(tmp_path), "--generation.checkpoint",
                       str(empty)])
    with pytest.raises(ValueError, match=r"generation.checkpoint: .* is neither a complete"):
        weights_folder(cfg)
    (empty / "config.json").write_text("{}")  # a Hugging Face folder now
    assert weights_folder(cfg) == str(empty)


def test_a_tokenizer_that_is_not_the_checkpoints_is_refused(repo_cwd, tmp_path):
    """More tokens than the checkpoint's vocab_size, or other bos/eos ids: ValueError (exit 2
    in the CLI) naming config.json and its field."""
    small = hf_model_folder(tmp_path / "small", SPM_PATH, **{**SHAPES["gqa4"],
                                                            "vocab_size": 2000})
    with pytest.raises(ValueError, match=r"small/config.json: vocab_size 2000 is smaller than "
                                         r"the tokenizer's 2256 tokens"):
        job_model_args("auto", small, 32, build_tokenizer("auto", TIKTOKEN_PATH))
    with pytest.raises(ValueError, match=r"small/config.json: bos_token_id 2000 but the "
                                         r"tokenizer \(.*small/tokenizer.model\) has 1"):
        job_model_args("auto", small, 32, build_tokenizer("auto", small))
