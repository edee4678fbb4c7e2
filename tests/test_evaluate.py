"""lm-evaluation-harness: titan_lite's model answers the harness's requests as the harness's own
Hugging Face backend does on the same tiny checkpoint (log-likelihoods to float32 tolerance,
the same greedy generations, the same scores on a local multiple-choice, perplexity and
generation task); `python -m titan_lite.evaluate` runs local tasks and refuses bad input in one
line."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, python_env
from test_families import make_hf_model
from test_jinja_templates import _hf_tokenizer

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

SEQ_LEN = 64  # (short: the perplexity task's long text rolls over several windows)
WORDS = ("And God said, Let there be light: and there was light. And God saw the light, that "
         "it was good: and God divided the light from the darkness.").split()
MC = [{"question": f"Verse {i}: {' '.join(WORDS[i:i + 6])}",  # (choices of 1, 2, 3 words)
       "choices": [" " + " ".join(WORDS[i + 6:i + 6 + n]) for n in (1, 2, 3)],
       "answer": i % 3} for i in range(8)]
TEXTS = [{"text": " ".join((WORDS[i:] + WORDS[:i]) * 4)} for i in range(0, 12, 3)]
QUESTIONS = [{"question": " ".join(WORDS[i:i + 5]), "answer": WORDS[i + 5]} for i in range(6)]
TASKS = {
    "tiny_mc": ("mc.jsonl", MC, """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""),
    "tiny_ppl": ("ppl.jsonl", TEXTS, """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""),
    "tiny_gen": ("gen.jsonl", QUESTIONS, """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Mistral-style folder whose tokenizer puts <s> before a text, as Llama 2's and
    Mistral's do, and a folder of local harness tasks on it."""
    from tokenizers import processors

    folder = tmp_path_factory.mktemp("mistral")
    hf = _hf_tokenizer(["</s>", "<unk>", "<s>"], "metaspace")
    hf.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", hf.token_to_id("<s>"))])
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}))
    make_hf_model("mistral", folder, vocab_size=hf.get_vocab_size(), sliding_window=None,
                  max_position_embeddings=SEQ_LEN, bos_token_id=hf.token_to_id("<s>"),
                  eos_token_id=hf.token_to_id("</s>"))
    tasks = tmp_path_factory.mktemp("tasks")
    for name, (file, docs, spec) in TASKS.items():
        (tasks / file).write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
            f"{tasks / file}\ntest_split: test\n{spec}")
    return folder, tasks


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """A tiny Qwen2-style folder with the ChatML template in its tokenizer_config.json."""
    from test_jinja_templates import TEMPLATES

    folder = tmp_path_factory.mktemp("qwen2")
    hf = _hf_tokenizer(["<|im_end|>", "<|endoftext|>", "<|im_start|>"], "digits+bytelevel")
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
        "eos_token": "<|im_end|>",
        "chat_template": open(os.path.join(TEMPLATES, "chatml.jinja")).read()}))
    make_hf_model("qwen2", folder, vocab_size=hf.get_vocab_size(),
                  max_position_embeddings=SEQ_LEN, bos_token_id=None,
                  eos_token_id=hf.token_to_id("<|im_end|>"))
    return folder


def _job(folder) -> list[str]:
    return ["--config", "train_configs/debug_model.toml", "--model.flavor", "auto",
            "--model.init_from", str(folder), "--tokenizer.path", str(folder),
            "--training.seq_len", str(SEQ_LEN), "--training.mixed_precision_param", "float32"]


def _compare(folder, tasks, names: list[str], chat: bool):
    """The harness's results and samples on ``names`` with titan_lite's model and with the
    harness's Hugging Face backend; asserts the requests and answers are equal."""
    from lm_eval.models.huggingface import HFLM

    from titan_lite.config import load_config
    from titan_lite.evaluate import task_manager
    from titan_lite.inference.harness import TitanLiteLM

    manager = task_manager(str(tasks), names)  # (the local tasks alone: no built-in index)
    assert set(manager.all_tasks) == set(TASKS)

    def evaluate(lm) -> dict:
        return lm_eval.simple_evaluate(model=lm, tasks=names, log_samples=True,
                                       apply_chat_template=chat, task_manager=manager)

    lm = TitanLiteLM.from_job(load_config(_job(folder)), batch_size=3)
    ours = evaluate(lm)
    theirs = evaluate(HFLM(pretrained=str(folder), device="cpu", batch_size=3,
                           dtype="float32", max_length=SEQ_LEN))
    for task in names:
        mine, reference = ours["samples"][task], theirs["samples"][task]
        assert len(mine) == len(reference) > 0
        for a, b in zip(mine, reference):
            assert a["arguments"] == b["arguments"]  # (the same requests)
            if task == "tiny_gen":
                assert a["resps"] == b["resps"]
                continue
            for x, y in zip(a["resps"], b["resps"]):
                x, y = (x[0], y[0]) if task == "tiny_mc" else (x, y)  # (logprob, greedy)
                assert x[0] == pytest.approx(y[0], abs=1e-4) and x[1:] == y[1:]
        for metric, value in theirs["results"][task].items():
            if isinstance(value, float):
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5), metric
    return lm


def test_requests_and_scores_equal_the_harness_hugging_face_backend(checkpoint, repo_cwd,
                                                                     monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder, tasks = checkpoint
    lm = _compare(folder, tasks, sorted(TASKS), chat=False)
    # the texts were longer than one window, so the rolling windows were exercised
    assert max(len(lm.tok_encode(t["text"])) for t in TEXTS) > 2 * SEQ_LEN


def test_chat_template_requests_equal_the_hugging_face_backends(checkpoint, chat_checkpoint,
                                                                repo_cwd, monkeypatch):
    """--apply_chat_template: each question a user turn in the checkpoint's own (Jinja)
    template, the choices and answers after its generation prompt."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm = _compare(chat_checkpoint, checkpoint[1], ["tiny_gen", "tiny_mc"], chat=True)
    assert lm._rendered and all(text.startswith("<|im_start|>user") for text in lm._rendered)


def test_evaluate_runs_local_tasks_and_refuses_bad_input_in_one_line(checkpoint, tmp_path):
    folder, tasks = checkpoint

    def evaluate(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "titan_lite.evaluate", *_job(folder), "--include_path",
             str(tasks), "--job.dump_folder", str(tmp_path), *extra], cwd=REPO,
            env=python_env(HF_DATASETS_OFFLINE="1"), capture_output=True, text=True,
            timeout=300)

    done = evaluate("--tasks", "tiny_mc,tiny_gen", "--limit", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.load(open(os.path.join(tmp_path, "eval_results.json")))["results"]
    assert set(results) == {"tiny_mc", "tiny_gen"} and "acc,none" in results["tiny_mc"]
    assert "tiny_mc" in done.stdout and "acc" in done.stdout  # the harness's table

    unknown = evaluate("--tasks", "tiny_mc,no_such_task")
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines()[-1].startswith(
        "error: evaluate.tasks: no harness task or group named 'no_such_task'")

    other = tmp_path / "other"  # a checkpoint of another shape than the job's model
    make_hf_model("mistral", other, vocab_size=700, sliding_window=None, hidden_size=32)
    wrong = evaluate("--tasks", "tiny_mc", "--checkpoint", str(other))
    assert wrong.returncode == 2, wrong.stderr[-3000:]
    assert len(wrong.stderr.strip().splitlines()) == 1 and str(other) in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_the_task_index_is_the_local_folder_alone_only_when_it_holds_every_task(checkpoint):
    from titan_lite.evaluate import task_manager

    tasks = str(checkpoint[1])
    assert set(task_manager(tasks, ["tiny_mc", "tiny_gen"]).all_tasks) == set(TASKS)
    both = set(task_manager(tasks, ["tiny_mc", "hellaswag"]).all_tasks)
    assert set(TASKS) < both and "hellaswag" in both
