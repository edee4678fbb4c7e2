"""The job's sections and keys: one dataclass per TOML section, one field per key.

Each field carries its default, help text and allowed values (``opt``); the loader, the checks
and ``--help`` are all generated from these classes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from titan_lite.models.llama3 import FLAVORS

DEFAULT_CONFIG = "train_configs/debug_model.toml"
AUTO_FLAVOR = "auto"  # model.flavor: the shape of model.init_from's config.json
TOKENIZER_KINDS = ("auto", "tiktoken", "sentencepiece", "huggingface")
BLOCK_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # the blocks' linears
TARGETS = (*BLOCK_TARGETS, "output")  # the linears LoRA can adapt


def opt(default: Any, help: str, *, choices: list | None = None, min: float | None = None,
        max: float | None = None) -> Any:
    """A config field: default, help text and the allowed values that validation enforces."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# data.chat_template's names (besides a .jinja path); data/chat_templates.py implements them
CHAT_TEMPLATES = ("auto", "llama3", "llama2", "chatml")

@dataclass
class Job:
    description: str = opt("titan_lite training job", "Free text printed at start-up.")
    dump_folder: str = opt("./outputs", "Folder for this run's metrics and saved config.")
    seed: int = opt(0, "Seed for weight init and data order; equal seeds give equal runs.", min=0)
    deterministic: bool = opt(False, "Use only deterministic kernels "
                              "(torch.use_deterministic_algorithms); slower.")


@dataclass
class Model:
    name: str = opt("llama3", "Model family (the Llama architecture: Llama 2 and 3.x).",
                    choices=["llama3"])
    flavor: str = opt("debugmodel", "Model size: a published one (Llama 3.x: 1B, 3B, 8B, 70B, "
                      "405B; Llama 2: llama2_7B, llama2_13B, llama2_70B), debugmodel or small "
                      "for development, or auto: the architecture in model.init_from's "
                      "config.json (any LlamaForCausalLM). The vocab size is that config.json's "
                      "when model.init_from has one, else the tokenizer's.",
                      choices=[*FLAVORS, AUTO_FLAVOR])
    init_from: str = opt("", "Weights to start from instead of random ones: a Hugging Face "
                         "Llama folder (config.json + *.safetensors) or a titan_lite checkpoint "
                         "folder (a step-N, or `python -m titan_lite.hf import` output); a "
                         "named flavor must match its architecture.")


@dataclass
class Tokenizer:
    kind: str = opt("auto", "tiktoken: Llama 3 BPE file (base64 token + rank per line); "
                    "sentencepiece: Llama 2 style .model file; huggingface: a tokenizer.json, "
                    "run by the tokenizers library; auto: told apart by the file's contents.",
                    choices=list(TOKENIZER_KINDS))
    path: str = opt("titan_lite/assets/tokenizers/test_tiktoken.model",
                    "Tokenizer file, or a model folder: its original/tokenizer.model, "
                    "tokenizer.model or tokenizer.json, in that order, with bos/eos/pad from "
                    "its tokenizer_config.json. A real Llama tokenizer works here.")


@dataclass
class Data:
    paths: list[str] = opt(["titan_lite/assets/data/kjv_sample.jsonl"],
                           "Training data, files or folders. format text: .txt files (one "
                           "document each), .json/.jsonl (one document per record) and .parquet "
                           "(one per row); alpaca and chat: .json (a JSON array or lines), "
                           ".jsonl or .parquet files of records. .txt/.json/.jsonl may be "
                           "compressed (.gz, .zst).")
    format: str = opt("text", "text: raw documents packed back to back, every token learned "
                      "(pretraining). alpaca: {instruction, input (optional), output} records. "
                      "chat: {messages: [{role: system|user|assistant, content}]} or ShareGPT "
                      "{conversations: [{from: system|human|gpt, value}]} records. Instruction "
                      "data is rendered with data.chat_template, packed into rows whose samples "
                      "do not attend to each other, and only the answers are learned.",
                      choices=["text", "alpaca", "chat"])
    chat_template: str = opt("auto", "How conversations become tokens (training, validation "
                             "samples, `generate --chat`): auto: the template the tokenizer's "
                             "folder ships (tokenizer_config.json chat_template or "
                             "chat_template.jinja, rendered with jinja2 as transformers does), "
                             "else llama3 when the tokenizer has Llama 3's header tokens, chatml "
                             "when it has <|im_start|> and <|im_end|>, else llama2. Named: "
                             "llama3 (header/eot control tokens), llama2 ([INST] ... [/INST], "
                             "<<SYS>>), chatml (<|im_start|>role ... <|im_end|>). Or a path to a "
                             ".jinja file.")
    train_on_prompt: bool = opt(False, "Instruction data: also learn the prompt, system and "
                                "header tokens (by default only the assistant's answers and "
                                "their end-of-turn token are targets).")
    overlong: str = opt("drop", "Instruction samples longer than training.seq_len (+1): drop "
                        "them, or truncate them to fit (samples left without answer tokens "
                        "are dropped). Counted in the length report at start-up.",
                        choices=["drop", "truncate"])
    text_field: str = opt("text", "Field (JSON) or column (Parquet) of each record that holds "
                          "the text (format text).")
    cache_dir: str = opt("", "Where the token cache goes; empty: beside the first source. On a "
                         "filesystem every node sees, the nodes build one cache together.")
    weights: list[float] = opt([], "Sampling weights, one per data.paths entry: each path is a "
                               "source (its own cache) and rows are drawn from the sources in "
                               "these proportions (see data/mixture.py); empty: the paths are "
                               "one corpus.")
    workers: int = opt(0, "Processes that tokenize, per builder (each rank of a node builds a "
                       "share of the cache): 0: the builder's share of the cores.", min=0)
    shard_mb: float = opt(64.0, "Source megabytes per cache part: the unit of parallel work, "
                          "of resuming a killed build, and of reading a large file in pieces.",
                          min=0.001)
    shuffle: bool = opt(True, "Shuffle the packed samples every epoch (seeded by job.seed).")


@dataclass
class Optimizer:
    name: str = opt("AdamW", "Optimizer.", choices=["AdamW"])
    lr: float = opt(8e-4, "Peak learning rate.", min=0.0)
    beta1: float = opt(0.9, "AdamW beta1.", min=0.0, max=1.0)
    beta2: float = opt(0.95, "AdamW beta2.", min=0.0, max=1.0)
    eps: float = opt(1e-8, "AdamW epsilon.", min=0.0)
    weight_decay: float = opt(0.1, "Decoupled weight decay for matrices; norms get none.",
                              min=0.0)
    implementation: str = opt("fused", "fused: one fused kernel per parameter group (fastest, "
                              "CPU included: ~6x foreach for a CPU-offloaded step); foreach: "
                              "multi-tensor kernels; for-loop: per-parameter reference.",
                              choices=["fused", "foreach", "for-loop"])
    state_dtype: str = opt("float32", "dtype of AdamW's two moments (the weights stay float32):"
                           " float32 (8 bytes per parameter), bfloat16 (4) or int8 (~2.03: "
                           "8-bit Adam's block-wise dynamic quantisation, blocks of 256; "
                           "tensors under 4,096 values or with rows not a multiple of 256 "
                           "keep float32). Stepped by torch's kernel slice by slice.",
                           choices=["float32", "bfloat16", "int8"])
    in_backward: bool = opt(False, "Step each FSDP unit's AdamW on the host as soon as backward "
                            "has delivered its gradients (a worker thread, overlapping the "
                            "backward of earlier blocks), then free them: the host never holds "
                            "the whole gradient. Needs training.enable_cpu_offload and "
                            "training.max_norm = 0 (the global norm is known only after the "
                            "last unit stepped; it is still logged).")


@dataclass
class LRScheduler:
    warmup_steps: int = opt(2, "Linear warmup steps from ~0 to optimizer.lr.", min=0)
    decay_type: str = opt("linear", "Decay after warmup down to the floor.",
                          choices=["linear", "cosine", "constant"])
    min_lr_ratio: float = opt(0.0, "LR floor at the last step, as a fraction of optimizer.lr.",
                              min=0.0, max=1.0)


@dataclass
class Training:
    local_batch_size: int = opt(8, "Sequences per micro-batch on each rank.", min=1)
    global_batch_size: int = opt(-1, "Sequences per optimizer step over all ranks; a multiple "
                                 "of local_batch_size x data-parallel degree (the quotient is "
                                 "the gradient accumulation count). -1: no accumulation.", min=-1)
    seq_len: int = opt(2048, "Tokens per sequence.", min=1)
    steps: int = opt(10, "Optimizer steps to train.", min=1)
    max_norm: float = opt(1.0, "Clip gradients to this global L2 norm; 0 disables clipping.",
                          min=0.0)
    mixed_precision_param: str = opt("float32", "Compute dtype. With FSDP: the dtype parameters "
                                     "are all-gathered and computed in (MixedPrecisionPolicy); "
                                     "without FSDP: the autocast dtype. Sharded weights and "
                                     "optimizer states stay float32. float16 (GPUs without "
                                     "bfloat16: V100, T4, RTX 20xx) adds dynamic loss "
                                     "scaling: steps with inf/NaN gradients are skipped.",
                                     choices=["float32", "bfloat16", "float16"])
    mixed_precision_reduce: str = opt("float32", "dtype of FSDP's gradient reduce-scatter "
                                      "(FSDP only).", choices=["float32", "bfloat16"])
    loss_chunks: int = opt(0, "Compute the output projection and the cross entropy over "
                           "this many slices of a micro-batch's tokens, each recomputed in "
                           "backward, so the logits, their float32 copy, softmax and gradient "
                           "exist for one slice at a time (~7 GiB less for a 128k vocabulary "
                           "at 2 x 2048 tokens; same loss up to rounding). 1: in one piece; "
                           "0 (auto): 8 slices for vocabularies of 32,000 tokens or more, "
                           "else 1.", min=0)
    compile: bool = opt(False, "torch.compile each transformer block (after activation "
                        "checkpointing, before FSDP) and the cross entropy. The first step "
                        "compiles (its time is printed); Inductor's cache goes to "
                        "<dump_folder>/inductor_cache unless TORCHINDUCTOR_CACHE_DIR is set. "
                        "Not with tensor parallel or activation_checkpoint.offload.")
    enable_cpu_offload: bool = opt(False, "Keep sharded parameters, gradients and AdamW states "
                                   "in host memory and run the optimizer step on CPU (FSDP2 "
                                   "CPUOffloadPolicy; turns FSDP on even for one rank). "
                                   "QLoRA on one shard: the NF4 base stays on the host too, "
                                   "each linear copied to the GPU where it computes.")
    device: str = opt("auto", "auto: CUDA + nccl when present, else CPU + gloo.",
                      choices=["auto", "cuda", "cpu"])
    float32_matmul_precision: str = opt(
        "highest", "torch.set_float32_matmul_precision for float32 matmuls: highest (full "
        "float32), high (TF32 tensor cores on NVIDIA GPUs from A100/RTX 30xx on: ~8x faster, "
        "10-bit mantissa inputs), medium (bfloat16 inputs). On CPU, oneDNN may also use "
        "reduced precision for high/medium where the processor supports it.",
        choices=["highest", "high", "medium"])


@dataclass
class Parallelism:
    dp_replicate: int = opt(1, "Replicated data-parallel degree: DDP, or HSDP's replica "
                            "groups when dp_shard > 1; -1: the world size left after the "
                            "other degrees.", min=-1)
    dp_shard: int = opt(-1, "Sharded data-parallel degree (FSDP2 fully_shard); -1: the world "
                        "size left after the other degrees.", min=-1)
    fsdp_reshard_after_forward: str = opt(
        "default", "Free each block's gathered parameters after its forward? default: yes, "
        "except the last block and the root, whose backward starts at once; always; never "
        "(more memory, no second all-gather in backward).",
        choices=["default", "always", "never"])
    fsdp_reduce_every_microbatch: bool = opt(
        True, "With gradient accumulation: reduce-scatter each micro-batch's gradients so only "
        "sharded gradients stay in memory; false: accumulate full-size gradients locally and "
        "reduce once on the last micro-batch (less communication, more memory).")
    tensor_parallel_degree: int = opt(1, "Tensor-parallel degree: heads, FFN width and vocab "
                                      "split over this many ranks (sequence parallel on the "
                                      "norms).", min=1)
    enable_loss_parallel: bool = opt(True, "With tensor parallel: compute the loss on the "
                                     "vocab-sharded logits instead of gathering them.")
    pipeline_parallel_degree: int = opt(1, "Pipeline-parallel degree: the blocks are split into "
                                        "stages on this many ranks.", min=1)
    pipeline_parallel_schedule: str = opt("1F1B", "GPipe, 1F1B (one stage per rank) or "
                                          "Interleaved1F1B (several stages per rank: 2 unless "
                                          "the split says otherwise).",
                                          choices=["GPipe", "1F1B", "Interleaved1F1B"])
    pipeline_parallel_microbatch_size: int = opt(1, "Sequences per pipeline micro-batch; "
                                                 "training.local_batch_size must be a multiple.",
                                                 min=1)
    pipeline_parallel_layers_per_stage: int = opt(-1, "Blocks per stage; -1: split the blocks "
                                                  "evenly over the stages.", min=-1)
    pipeline_parallel_split_points: list[str] = opt([], "Blocks that start a new stage, e.g. "
                                                    "layers.4,layers.8 (overrides "
                                                    "layers_per_stage).")


@dataclass
class ActivationCheckpoint:
    mode: str = opt("none", "Recompute activations in backward instead of keeping them: none; "
                    "full: every block; selective: see selective_ac_option.",
                    choices=["none", "full", "selective"])
    selective_ac_option: str = opt("op", "For mode = selective. 'op': in every block keep the "
                                   "outputs of matmuls and attention and recompute the cheap "
                                   "ops (norms, activations, RoPE); an integer k: checkpoint "
                                   "every k-th block fully.")
    offload: bool = opt(False, "Move what the forward saves for backward (with full AC: each "
                        "block's input, ~1 GiB for an 8B at 2 x 2048 tokens) to pinned host "
                        "memory, and back in backward. GPU only; not with pipeline parallel.")


@dataclass
class Lora:
    enable: bool = opt(False, "Fine-tune low-rank adapters (LoRA) on a frozen base instead of "
                       "every weight: the base gets no gradients and no AdamW states and is "
                       "held in lora.base_dtype; only the adapters train, in float32. The base "
                       "comes from model.init_from (or job.seed) again on every resume.")
    rank: int = opt(8, "Rank r of each adapter (A: r x in_features, B: out_features x r).",
                    min=1)
    alpha: float = opt(16.0, "The adapters' update is scaled by alpha / rank; > 0.")
    dropout: float = opt(0.0, "Dropout on each adapter's input while training.", min=0.0,
                         max=0.9)
    target_modules: list[str] = opt(list(BLOCK_TARGETS), "Linears that get adapters: wq, wk, "
                                    "wv, wo (attention), w1, w2, w3 (FFN), output (the LM "
                                    "head); the others stay frozen.", choices=list(TARGETS))
    base_dtype: str = opt("bfloat16", "dtype the frozen base is stored in (embeddings, norms, "
                          "linears not quantised).", choices=["bfloat16", "float32"])
    quantize_base: str = opt("none", "QLoRA: nf4 stores the frozen linears of the blocks in "
                             "4-bit NormalFloat with double-quantised block scales (~0.52 "
                             "bytes per weight), dequantised block by block in forward and "
                             "backward; embeddings, norms and the output stay in base_dtype. "
                             "Needs the qlora extra: pip install -e '.[qlora]'.",
                             choices=["none", "nf4"])
    embedding_on_host: bool = opt(False, "Keep the frozen embedding table in host memory: "
                                  "the lookup runs on the host and only the batch's rows go "
                                  "to the device (~1 GiB less for an 8B on a GPU; FSDP and "
                                  "DDP leave the table out, each rank holds it whole). Not "
                                  "with tied embeddings (1B, 3B), whose table is the output "
                                  "projection too.")
    save_base: bool = opt(False, "Also store the frozen base in checkpoints (by default they "
                          "hold only the adapters and their optimizer states, and a "
                          "fingerprint the resume checks the base against).")


@dataclass
class Comm:
    init_timeout_seconds: float = opt(600.0, "How long a collective may wait before the first "
                                      "training step is done (start-up: process group, loading "
                                      "weights, the first compile; building the data cache "
                                      "does not count: ranks wait on its files).", min=1.0)
    train_timeout_seconds: float = opt(300.0, "How long a collective may wait from then on "
                                       "(checkpoint saves included): a rank that hangs ends the "
                                       "job with one line naming the collective, and the last "
                                       "complete checkpoint is kept.", min=1.0)


@dataclass
class Checkpoint:
    enable: bool = opt(False, "Save distributed checkpoints and, on start, resume from the "
                       "newest complete one in the folder.")
    folder: str = opt("checkpoint", "Where checkpoints go: step-N folders, relative to "
                      "job.dump_folder (or absolute).")
    interval: int = opt(500, "Save every this many steps, and always after the last step.",
                        min=1)
    keep_latest_k: int = opt(3, "Keep only the newest k complete checkpoints; 0 keeps all.",
                             min=0)
    load_step: int = opt(-1, "Resume from this step's checkpoint; -1: the newest complete "
                         "one (a fresh start when there is none).", min=-1)
    async_mode: str = opt("disabled", "disabled: training waits while a checkpoint is written; "
                          "async: the state is copied to host memory and written by a "
                          "background thread (over its own gloo group) while training goes "
                          "on; it is published once every rank has finished.",
                          choices=["disabled", "async"])


@dataclass
class Metrics:
    log_freq: int = opt(1, "Print and record metrics every this many steps.", min=1)
    enable_jsonl: bool = opt(True, "Write metrics as JSON lines to "
                             "<dump_folder>/metrics/rank<N>.jsonl.")
    jsonl_all_ranks: bool = opt(False, "Every rank writes its JSONL file, not just rank 0.")
    enable_tensorboard: bool = opt(False, "Also write TensorBoard events (needs the tensorboard "
                                   "package).")
    track_cpu_memory: bool = opt(True, "On CPU, measure peak memory as the bytes of live "
                                 "tensors (a dispatch-mode tracker; a few % slower). On CUDA "
                                 "the allocator's own peak is always used.")
    cpu_peak_tflops: float = opt(0.0, "Peak TFLOP/s of one rank for MFU on CPU; 0: measure a "
                                 "float32 matmul at start-up.", min=0.0)


@dataclass
class Validation:
    paths: list[str] = opt([], "Held-out data in data.format (files or folders); empty: none, "
                           "or validation.split.")
    split: float = opt(0.0, "Fraction of the training data held out for validation instead "
                       "(chosen deterministically from job.seed; instruction data is split by "
                       "sample before packing). 0: no split.", min=0.0, max=0.5)
    interval: int = opt(0, "Validate every this many steps; 0: only after the last step.",
                        min=0)
    steps: int = opt(-1, "Batches per validation (training.local_batch_size rows per rank); "
                     "-1: all of the validation data.", min=-1)
    at_start: bool = opt(True, "Also validate before the first step of a fresh run (the "
                         "'before' figure).")
    sample_prompts: list[str] = opt([], "Prompts the model answers at every validation (with "
                                    "the [generation] settings; as a chat user turn for "
                                    "instruction data), to see what it learned.")


@dataclass
class Generation:
    prompt: str = opt("", "`python -m titan_lite.generate`: text to continue, or with "
                      "generation.chat the user's message.")
    chat: bool = opt(False, "Render the prompt as a user turn with data.chat_template and "
                     "answer as the assistant; without a prompt, chat interactively on stdin.")
    system: str = opt("", "System prompt in chat mode.")
    max_new_tokens: int = opt(128, "Most tokens to generate per answer.", min=1)
    temperature: float = opt(0.0, "Sampling temperature; 0: greedy decoding.", min=0.0)
    top_k: int = opt(0, "Sample only from the k most likely tokens; 0: all.", min=0)
    top_p: float = opt(1.0, "Sample only from the smallest set of tokens whose probability "
                       "reaches p (nucleus sampling); 1: all.", min=0.0, max=1.0)
    seed: int = opt(0, "Seed of the sampling RNG.", min=0)
    checkpoint: str = opt("", "Weights to generate from: empty = the newest checkpoint of the "
                          "job (checkpoint.folder), else model.init_from; 'step-N' = that "
                          "checkpoint of the job; or a folder (Hugging Face or titan_lite "
                          "checkpoint).")


@dataclass
class Predict:
    data: str = opt("", "`python -m titan_lite.predict`: the instruction data to answer (files "
                    "or a folder in data.format, any file type the trainer reads); each "
                    "record's last assistant answer is the reference it is scored against. "
                    "Weights and sampling are [generation]'s.")
    batch_size: int = opt(8, "Prompts answered at once (one KV cache; finished rows leave the "
                          "batch).", min=1)
    output: str = opt("", "JSON lines file for the predictions (prompt, reference, prediction, "
                      "token counts), in the data's order; empty: "
                      "<job.dump_folder>/predictions.jsonl.")
    compare: str = opt("", "Also answer with the model before fine-tuning and print both score "
                       "rows and the change: 'base' (a LoRA job: this model with its adapters "
                       "switched off, no second copy in memory; otherwise model.init_from), "
                       "or a step-N / folder (Hugging Face or titan_lite checkpoint).")


@dataclass
class Evaluate:
    tasks: list[str] = opt([], "`python -m titan_lite.evaluate`: lm-evaluation-harness tasks or "
                           "groups to score the model on (the harness's names, or the tasks "
                           "of evaluate.include_path). Weights are [generation]'s checkpoint.")
    include_path: str = opt("", "A folder of your own harness task YAML files (local data: "
                            "dataset_path json with data_files), searched before the "
                            "harness's.")
    num_fewshot: int = opt(-1, "Examples put before each question; -1: each task's own "
                           "setting.", min=-1)
    limit: int = opt(0, "Score only the first N documents of each task (a quick check; the "
                     "harness marks such results as not comparable); 0: all.", min=0)
    batch_size: int = opt(8, "Requests scored or answered at once.", min=1)
    chat_template: bool = opt(False, "Put each request in the job's chat template "
                              "(data.chat_template), as lm_eval's --apply_chat_template: for "
                              "instruction-tuned models; few-shot examples as earlier turns.")
    output: str = opt("", "JSON file for the harness's results; empty: "
                      "<job.dump_folder>/eval_results.json.")


@dataclass
class Estimate:
    num_gpus: int = opt(0, "Ranks to estimate for (`--estimate`): 0 = NGPU / WORLD_SIZE, else 1.",
                        min=0)
    gpu: str = opt("", "GPU model whose memory (and speed, for the planner) to assume, e.g. "
                   "H100, A100-40GB, RTX 4090 (see titan_lite/estimate/gpus.py).")
    device_memory_gb: float = opt(0.0, "Memory per GPU in GiB for the fit verdict; 0 = the "
                                  "GPU's (estimate.gpu), or no verdict.", min=0)
    host_memory_gb: float = opt(0.0, "Host memory per rank in GiB that a plan may fill (CPU "
                                "offload's weights, gradients and AdamW states); 0 = not "
                                "checked. E.g. 56 on a 64 GB desktop.", min=0)
    plan: bool = opt(False, "Search CPU offload, AC mode, local batch (same global batch), "
                     "FSDP degree, AdamW's state dtype, (offloaded, without accumulation) "
                     "the step in backward, the loss in slices, a frozen embedding on the "
                     "host and full AC's offload for the fastest configs that fit.")
    plan_top: int = opt(5, "How many fitting configs the planner prints (per method).", min=1)
    plan_methods: list[str] = opt(["full"], "Fine-tuning methods the planner tries: full "
                                  "(every weight trained), lora (adapters on a frozen bf16 "
                                  "base), qlora (the base's block linears in NF4); lora.rank "
                                  "and the other lora.* keys as configured. Listed in this "
                                  "order, the fastest fitting layouts of each.",
                                  choices=["full", "lora", "qlora"])
    plan_shorter_seq_len: bool = opt(False, "Let the planner also try training.seq_len / 2 and "
                                     "/ 4 (same tokens per step), if shorter samples are "
                                     "acceptable for the model.")


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    tokenizer: Tokenizer = field(default_factory=Tokenizer)
    data: Data = field(default_factory=Data)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    lora: Lora = field(default_factory=Lora)
    comm: Comm = field(default_factory=Comm)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)
    validation: Validation = field(default_factory=Validation)
    generation: Generation = field(default_factory=Generation)
    predict: Predict = field(default_factory=Predict)
    evaluate: Evaluate = field(default_factory=Evaluate)
    estimate: Estimate = field(default_factory=Estimate)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The whole config as TOML that ``load_config`` reads back to an equal JobConfig."""
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
            lines.append("")
        return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)
