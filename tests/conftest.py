import os
import sys

import pytest
import torch

from titan_lite.runtime.distributed import DistEnv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIKTOKEN_PATH = os.path.join(REPO, "titan_lite/assets/tokenizers/test_tiktoken.model")
SPM_PATH = os.path.join(REPO, "titan_lite/assets/tokenizers/test_spm.model")
CORPUS = os.path.join(REPO, "titan_lite/assets/data/kjv_sample.jsonl")

torch.set_num_threads(min(2, os.cpu_count() or 1))

# One process, no process group: how tests call train() directly.
CPU_ENV = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1,
                  device=torch.device("cpu"))


@pytest.fixture
def repo_cwd(monkeypatch):
    """Run with the repository as the working directory, as run_train.sh does."""
    monkeypatch.chdir(REPO)
    return REPO


def python_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: one thread per rank, no inherited torchrun variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> dict:
    """The debug model trained in one process on batch 4: what every layout must reproduce."""
    from layouts import run_layout

    return run_layout(tmp_path_factory.mktemp("reference"), "one", 1,
                      "--training.local_batch_size", "4")
