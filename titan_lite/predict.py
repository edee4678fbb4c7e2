"""Answer every sample of an instruction data set with the job's model and score the answers.

    python -m titan_lite.predict --config train_configs/debug_sft.toml \\
        --predict.data data/held_out.jsonl --max_new_tokens 64

Each record (any format and file type the trainer reads) is split into its prompt (every turn
before the last assistant answer, rendered by the job's chat template with the generation
prompt) and its reference (that answer). Prompts are answered in batches of
``predict.batch_size`` with one KV cache (``generation.generate_batch``: left padding never
attended to, finished rows leave the batch; the answers equal one prompt at a time). Weights and
sampling are ``[generation]``'s (checkpoint, max_new_tokens, temperature, top_k, top_p, seed);
bare ``--key value`` options name [generation] or [predict] keys. Writes one JSON line per
sample, in the data's order, to ``predict.output`` and prints the scores (``text_scores``).
Under torchrun (``torchrun --nproc_per_node N -m titan_lite.predict ...``) every rank holds the
whole model and answers a share of the samples; rank 0 writes them all and scores them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from titan_lite.config import Generation, JobConfig
from titan_lite.data import ChatTemplate, build_chat_template
from titan_lite.data.chat import Message, record_messages
from titan_lite.data.sources import RECORD_SUFFIXES, records, source_files
from titan_lite.runtime.distributed import init_distributed, on_every_rank
from titan_lite.finetune.lora import adapters_off
from titan_lite.inference.cli import answer_cli
from titan_lite.inference.model import load_model
from titan_lite.inference.generation import generate_batch
from titan_lite.runtime.metrics import Progress
from titan_lite.data.tokenizer import build_tokenizer

_INSTALL = "pip install 'titan_lite[eval]'"


@dataclass
class Sample:
    location: str  # file:line of its record
    messages: list[Message]  # the turns before the answer
    reference: str  # the last assistant answer


@dataclass
class Prediction:
    prompt_tokens: int
    text: str
    new_tokens: int


def load_samples(path: str, data_format: str) -> list[Sample]:
    """The samples of the records in ``path`` (files or a folder): each record's last
    assistant answer is its reference; ValueError naming the record when it has none."""
    samples = []
    for file in source_files([path], RECORD_SUFFIXES, "predict.data"):
        for location, record in records(file):
            try:
                messages = record_messages(record, data_format)
            except ValueError as e:
                raise ValueError(f"{location}: {e} (predict.data needs a reference answer in "
                                 "every record)") from None
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            samples.append(Sample(location, messages[:last], messages[last]["content"]))
    return samples


def predict(model: torch.nn.Module, samples: list[Sample], template: ChatTemplate,
            sampling: Generation, batch_size: int, device: torch.device,
            log: Callable[[str], None] | None = None, rank: int = 0, world_size: int = 1
            ) -> list[Prediction]:
    """The answers to ``samples``, in their order; prompts of similar lengths are batched
    together (longest first, so a batch wastes little on padding). With ``world_size`` ranks
    (a process group, each rank holding the whole model) each answers every world_size-th
    prompt of that order and every rank returns all the answers."""
    prompts = [template.prompt(sample.messages) for sample in samples]
    limit = model.args.max_seq_len
    for sample, prompt in zip(samples, prompts):
        if len(prompt) >= limit:
            raise ValueError(f"{sample.location}: the prompt has {len(prompt)} tokens; the "
                             f"model takes at most {limit - 1} before its answer (raise "
                             "training.seq_len)")
    # (dealt out by length, so each rank gets as much work of each size)
    mine = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))[rank::world_size]
    out: dict[int, Prediction] = {}
    stop = set(template.stop_ids)
    progress = Progress(len(mine), "samples" + (f" on rank {rank}" if world_size > 1 else ""),
                        log)
    started, new_tokens = time.monotonic(), 0
    for first in range(0, len(mine), batch_size):
        batch = mine[first:first + batch_size]
        answers = generate_batch(model, [prompts[i] for i in batch], sampling, stop, device)
        for index, answer in zip(batch, answers):
            out[index] = Prediction(len(prompts[index]), template.tokenizer.decode(answer.ids),
                                    len(answer.ids))
            new_tokens += len(answer.ids)
        rate = new_tokens / max(time.monotonic() - started, 1e-9)
        progress.advance(len(batch), f"{rate:,.1f} new tokens/s")
    if world_size > 1:
        shares: list[dict[int, Prediction]] = [{} for _ in range(world_size)]
        dist.all_gather_object(shares, out)
        out = {index: answer for share in shares for index, answer in share.items()}
    return [out[index] for index in range(len(prompts))]


SCORE_SETTINGS = {  # what text_scores computes, written beside the scores
    "exact_match": "after stripping white space",
    "rouge": "rouge-score RougeScorer(rouge1, rouge2, rougeL, use_stemmer=True), F1 averaged "
             "over samples",
    "bleu4": "sacrebleu corpus_bleu defaults (13a tokenizer, exp smoothing)",
}


def text_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Scores in percent, by the libraries people cite, with their standard settings:
    exact match (after stripping white space); ROUGE-1/2/L F1 averaged over samples
    (``rouge-score``'s RougeScorer, Porter stemming on); corpus BLEU-4 (``sacrebleu``'s
    corpus_bleu defaults: 13a tokenizer, exponential smoothing)."""
    sacrebleu, rouge_scorer = _scoring_libraries()
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = [scorer.score(reference, prediction)
             for prediction, reference in zip(predictions, references)]
    count = max(len(predictions), 1)
    scores = {"exact_match": 100 * sum(p.strip() == r.strip() for p, r in
                                       zip(predictions, references)) / count}
    for name in ("rouge1", "rouge2", "rougeL"):
        scores[name] = 100 * sum(r[name].fmeasure for r in rouge) / count
    scores["bleu4"] = sacrebleu.corpus_bleu(predictions, [references]).score
    return scores


def _scoring_libraries() -> tuple:
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise ValueError(f"scores need rouge-score and sacrebleu ({_INSTALL}): {e}") from None
    return sacrebleu, rouge_scorer


def run(cfg: JobConfig) -> dict[str, float]:
    p = cfg.predict
    if not p.data:
        raise ValueError("predict.data: name the data set to answer (an instruction data file "
                         "or folder, in data.format)")
    if cfg.data.format == "text":
        raise ValueError("predict: data.format is 'text'; predictions need instruction records "
                         "(alpaca or chat) with reference answers")
    _scoring_libraries()  # (missing: said before any answer is generated)
    env = init_distributed(cfg.training.device, cfg.comm.init_timeout_seconds)
    samples = on_every_rank(lambda: load_samples(p.data, cfg.data.format))
    if not samples:
        raise ValueError(f"predict.data: no records in {p.data}")
    device, lead = env.device, env.rank == 0
    tokenizer = build_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
    template = build_chat_template(cfg.data.chat_template, tokenizer, cfg.tokenizer.path)

    def answer(model: torch.nn.Module, name: str) -> list[Prediction]:
        return predict(model, samples, template, cfg.generation, p.batch_size, device,
                       log=(lambda m: print(f"{name}: {m}", file=sys.stderr, flush=True))
                       if lead else None, rank=env.rank, world_size=env.world_size)

    model = load_model(cfg, tokenizer, device)
    answers, before = answer(model, "predict"), None
    if p.compare:
        if cfg.lora.enable and p.compare in ("base", cfg.model.init_from):
            with adapters_off(model):
                before = answer(model, "predict (base: adapters off)")
        else:
            del model  # (one model in memory at a time)
            before = answer(load_model(_compared(cfg), tokenizer, device), "predict (compare)")
    if not lead:
        return {}
    references = [s.reference for s in samples]
    rows = {"after": text_scores([a.text for a in answers], references)}
    if before is not None:
        rows = {"before": text_scores([b.text for b in before], references), **rows}
        rows["change"] = {name: value - rows["before"][name]
                          for name, value in rows["after"].items()}
    output = p.output or os.path.join(cfg.job.dump_folder, "predictions.jsonl")
    _write(output, samples, answers, before)
    scores_file = os.path.splitext(output)[0] + ".scores.json"
    with open(scores_file, "w") as fh:
        json.dump({"samples": len(samples), "settings": SCORE_SETTINGS, **rows}, fh, indent=1)
    print(f"{len(samples)} predictions -> {output}, scores -> {scores_file}")
    for name, row in rows.items():
        sign = "+" if name == "change" else ""
        print(f"{name:<7}" * (before is not None) + "  ".join(
            f"{metric} {value:{sign}.2f}" for metric, value in row.items()))
    return rows["after"]


def _compared(cfg: JobConfig) -> JobConfig:
    """The job, generating from what predict.compare names."""
    choice = cfg.predict.compare
    if choice == "base":
        if not cfg.model.init_from:
            raise ValueError("predict.compare: 'base' needs model.init_from (the weights the "
                             "fine-tune started from) or a LoRA job")
        choice = cfg.model.init_from
    lora = dataclasses.replace(cfg.lora, enable=False) if choice == cfg.model.init_from else (
        cfg.lora)
    return dataclasses.replace(cfg, lora=lora, generation=dataclasses.replace(
        cfg.generation, checkpoint=choice))


def _write(output: str, samples: list[Sample], answers: list[Prediction],
           before: list[Prediction] | None) -> None:
    """One JSON line per sample, in the data's order."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as fh:
        for index, (sample, answer) in enumerate(zip(samples, answers)):
            line = {"source": sample.location, "prompt": sample.messages,
                    "reference": sample.reference, "prediction": answer.text,
                    "prompt_tokens": answer.prompt_tokens, "new_tokens": answer.new_tokens}
            if before is not None:
                line["prediction_before"] = before[index].text
            fh.write(json.dumps(line) + "\n")


def main(argv: list[str] | None = None) -> None:
    answer_cli(run, argv, "titan_lite.predict", ("predict", "generation"))


if __name__ == "__main__":
    main()
