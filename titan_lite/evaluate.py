"""Score a job's model on EleutherAI lm-evaluation-harness tasks.

    python -m titan_lite.evaluate --config train_configs/debug_sft.toml \\
        --tasks hellaswag,arc_easy --limit 100

The weights are ``[generation] checkpoint``'s (the newest checkpoint, a step-N, a titan_lite or
Hugging Face folder; a LoRA job: its base plus that checkpoint's adapters), run by
``titan_lite.inference.harness.TitanLiteLM`` in one process (CUDA when present). Bare
``--key value`` options name [evaluate] or [generation] keys. Prints the harness's table and
writes its results to ``evaluate.output``. Needs the ``eval`` extra; tasks on the hub need their
data set downloadable (HF_DATASETS_OFFLINE=1 and a local ``evaluate.include_path`` task
otherwise).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from titan_lite.config import JobConfig
from titan_lite.inference.cli import answer_cli

_INSTALL = "pip install 'titan_lite[eval]'"


def run(cfg: JobConfig) -> dict:
    e = cfg.evaluate
    if not e.tasks:
        raise ValueError("evaluate.tasks: name the lm-evaluation-harness tasks to run "
                         "(e.g. --tasks arc_easy,hellaswag)")
    try:
        import lm_eval

        from titan_lite.inference.harness import TitanLiteLM
    except ImportError as err:
        raise ValueError(f"evaluate needs lm-evaluation-harness ({_INSTALL}): {err}") from None
    if e.include_path and not os.path.isdir(e.include_path):
        raise ValueError(f"evaluate.include_path: {e.include_path!r} is not a folder")
    manager = task_manager(e.include_path, e.tasks)
    known = set(manager.all_tasks)
    unknown = [task for task in e.tasks if task not in known]
    if unknown:
        raise ValueError(f"evaluate.tasks: no harness task or group named "
                         f"{', '.join(map(repr, unknown))} (see `lm_eval ls tasks`"
                         f"{', or the YAML files in ' + e.include_path if e.include_path else ''})")
    lm = TitanLiteLM.from_job(cfg, e.batch_size)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(e.tasks), task_manager=manager,
        num_fewshot=None if e.num_fewshot < 0 else e.num_fewshot, limit=e.limit or None,
        apply_chat_template=e.chat_template, log_samples=False)
    print(lm_eval.utils.make_table(results))
    output = e.output or os.path.join(cfg.job.dump_folder, "eval_results.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as fh:
        json.dump({key: results[key] for key in ("results", "configs", "versions", "n-shot")
                   if key in results}, fh, indent=1, default=str)
    print(f"results -> {output}", file=sys.stderr)
    return results["results"]


def task_manager(include_path: str, tasks: list[str]) -> Any:
    """The harness's task index: of ``include_path`` alone when every name asked for is a task
    there (not a group, whose members may be built-in ones), since indexing the harness's
    thousands of built-in task files takes ~11 s on a 2-core CPU; of both otherwise."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_subtasks):
            return local
    return TaskManager(include_path=include_path or None)


def main(argv: list[str] | None = None) -> None:
    answer_cli(run, argv, "titan_lite.evaluate", ("evaluate", "generation"))


if __name__ == "__main__":
    main()
