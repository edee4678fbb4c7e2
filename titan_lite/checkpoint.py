"""Distributed checkpoints (torch.distributed.checkpoint) that resume exactly and survive crashes.

A checkpoint is the folder ``<checkpoint.folder>/step-N``. Every rank writes its shards into
``step-N.partial``; only when all ranks have finished does rank 0 rename it to ``step-N`` (an
atomic rename), so a crash or ``kill -9`` during a save leaves the previous checkpoint as the
newest complete one. Only tensors are stored (weights, AdamW moments and step counts, the
schedule's step, the data position, each rank's CPU and accelerator RNG states), keyed by
parameter name, so checkpoints load into any layout and are read without unpickling anything
but DCP's own metadata classes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
import os
import pickle
import re
import shutil
import signal
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from titan_lite.config import Checkpoint
from titan_lite.data import PackedDataLoader
from titan_lite.runtime.distributed import barrier, local_shard
from titan_lite.finetune.nf4 import is_quantized
from titan_lite.optim import LossScaler
from titan_lite.parallel.init import write_shard

_STEP_FOLDER = re.compile(r"step-(\d+)")
# DCP warns on every save and load without a process group (also from the async writer's
# thread) that it assumes a single process; that is what we mean.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or "
                        "uninitialized")
_DATA_FIELDS = ("epoch", "samples_in_epoch", "num_samples", "seed")


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be used; the message names it."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's .metadata and nothing else: DCP's own plain data classes (dataclasses
    and enums of its metadata modules, whichever this torch has: another torch version may
    write classes this list would not name), torch sizes, dtypes and layouts, paths and plain
    containers, so a crafted file cannot run code."""

    _DCP_MODULES = ("torch.distributed.checkpoint.metadata",
                    "torch.distributed.checkpoint.filesystem")
    _ALLOWED = {
        "torch.serialization": {"_get_layout"},  # maps a layout's name to torch.layout
        "pathlib": {"PosixPath", "PurePosixPath"},
        "collections": {"OrderedDict"},
        "builtins": {"dict", "list", "tuple", "set", "frozenset", "int", "float", "str",
                     "bytes", "bool", "slice"},
    }

    def find_class(self, module: str, name: str) -> type:
        if module == "torch" and (name == "Size" or isinstance(
                getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))):
            return getattr(torch, name)
        if module in self._DCP_MODULES:
            found = getattr(importlib.import_module(module), name, None)
            if isinstance(found, type) and (dataclasses.is_dataclass(found)
                                            or issubclass(found, enum.Enum)):
                return found
            if found is None:
                raise pickle.UnpicklingError(
                    f"checkpoint metadata names {module}.{name}, which this torch "
                    f"({torch.__version__}) does not have: was the checkpoint written by "
                    "another torch version? Load it with that version")
        elif name in self._ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint "
                                     "metadata")


class _SafeReader(FileSystemReader):
    """FileSystemReader whose metadata goes through ``_MetadataUnpickler``."""

    def read_metadata(self, *args: object, **kwargs: object) -> Metadata:
        with open(self._get_metadata_path(kwargs.get("rank")), "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(".metadata does not hold DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def publish(partial: str, final: str) -> None:
    """Rename ``partial`` to ``final`` atomically; an older ``final`` (a run that resumed from
    an earlier step saves this step again) is moved aside first and deleted after."""
    replaced = final + ".replaced"
    if os.path.exists(final):
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(partial, final)
    shutil.rmtree(replaced, ignore_errors=True)


def complete_steps(folder: str) -> list[int]:
    """Steps with a complete (published) checkpoint in ``folder``, oldest first."""
    if not os.path.isdir(folder):
        return []
    steps = [int(m.group(1)) for m in map(_STEP_FOLDER.fullmatch, os.listdir(folder)) if m]
    return sorted(steps)


class Checkpointer:
    """Saves and restores everything a run needs to continue exactly where it stopped."""

    def __init__(self, cfg: Checkpoint, dump_folder: str, model_parts: Iterable[nn.Module],
                 optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, loader: PackedDataLoader,
                 frozen_base: dict[str, torch.Tensor] | None = None,
                 save_frozen: bool = True, grad_scaler: LossScaler | None = None,
                 device: torch.device = torch.device("cpu")):
        """``device``: the rank's compute device, whose RNG (e.g. LoRA dropout's on a GPU) is
        stored beside the CPU's. ``frozen_base``: the fingerprint
        (``finetune.base_fingerprint``) of a frozen base the run does not train; it is stored,
        and a resume onto another base refuses. The frozen
        parameters themselves are stored only with ``save_frozen``. ``grad_scaler``: float16's
        loss scale and its count of good steps are stored when it is enabled."""
        self.cfg = cfg
        self.folder = os.path.join(dump_folder, cfg.folder)
        self.parts, self.optimizer = list(model_parts), optimizer
        self.scheduler, self.loader = scheduler, loader
        self.grad_scaler = grad_scaler if grad_scaler and grad_scaler.is_enabled() else None
        self.device = device
        self.frozen_base, self.save_frozen = frozen_base or {}, save_frozen
        self._pending: tuple[Future, str, str] | None = None  # async save: (future, from, to)
        self._async_group = None
        if cfg.async_mode == "async" and dist.is_initialized():
            # The writer thread's collectives get their own group: sharing the training
            # group with a background thread deadlocks.
            self._async_group = dist.new_group(backend="gloo")

    def _state(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for part in self.parts:
            for name, param in part.named_parameters():
                if param.requires_grad or self.save_frozen:
                    state[f"model.{name}"] = param
                for key, value in self.optimizer.state.get(param, {}).items():
                    state[f"optimizer.{name}.{key}"] = value
        state.update({f"base.{name}": sums.clone() for name, sums in self.frozen_base.items()})
        state["train.lr_step"] = torch.tensor(self.scheduler.last_epoch)
        loader_state = self.loader.state_dict()
        state["train.data"] = torch.tensor([loader_state[k] for k in _DATA_FIELDS])
        state.update(rng_state(self.device, _rank()))
        if self.grad_scaler:
            scaler = self.grad_scaler.state_dict()  # the scale and its count of good steps
            state["train.loss_scale"] = torch.tensor(
                [scaler["scale"], scaler["good_steps"]], dtype=torch.float64)
        return state

    def save(self, step: int) -> None:
        """Write ``step-<step>`` on every rank; publish it when all are done (at once, or for an
        async save at the next ``save``/``wait``), then prune old ones."""
        self.wait()
        final = os.path.join(self.folder, f"step-{step}")
        partial = final + ".partial"
        if _rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)  # left by a crash mid-save
            os.makedirs(self.folder, exist_ok=True)
        barrier()
        state = self._state()
        state["train.step"] = torch.tensor(step)
        writer = FileSystemWriter(partial)
        if self.cfg.async_mode == "async":
            future = dcp.async_save(state, storage_writer=writer, no_dist=_single(),
                                    process_group=self._async_group)
            self._pending = (future, partial, final)
            return
        dcp.save(state, storage_writer=writer, no_dist=_single())
        self._publish(partial, final)

    def wait(self) -> None:
        """Finish and publish a pending async save (call before the process ends)."""
        if self._pending is not None:
            future, partial, final = self._pending
            self._pending = None
            future.result()
            self._publish(partial, final)

    def _publish(self, partial: str, final: str) -> None:
        barrier()  # every rank's shards are on disk
        if _rank() == 0:
            publish(partial, final)
            self._prune()
        barrier()

    def _prune(self) -> None:
        """Drop torn saves of earlier crashes and all but the newest keep_latest_k."""
        old = [f"step-{step}" for step in complete_steps(self.folder)]
        old = old[:-self.cfg.keep_latest_k] if self.cfg.keep_latest_k > 0 else []
        old += [name for name in os.listdir(self.folder) if name.endswith(".partial")]
        for name in old:
            shutil.rmtree(os.path.join(self.folder, name), ignore_errors=True)

    def restore(self) -> int:
        """Load the checkpoint to resume from (checkpoint.load_step, or the newest complete
        one); returns its step, or 0 when there is none to resume from."""
        steps = complete_steps(self.folder)
        if self.cfg.load_step > 0:
            if self.cfg.load_step not in steps:
                raise CheckpointError(f"checkpoint.load_step: no complete checkpoint step-"
                                      f"{self.cfg.load_step} in {self.folder} (found: "
                                      f"{', '.join(map(str, steps)) or 'none'})")
            step = self.cfg.load_step
        elif steps:
            step = steps[-1]
        else:
            return 0
        path = os.path.join(self.folder, f"step-{step}")
        _materialize_optimizer_state(self.optimizer)
        state = self._state()
        state["train.step"] = torch.tensor(0)
        # A resume on more ranks than saved finds no RNG of its own for the new ranks: they
        # keep the seed's (a resume on another layout is not bit-exact anyway).
        advice = "; delete it or set checkpoint.load_step to an older step"
        with _loading(path, advice):
            stored = _SafeReader(path).read_metadata().state_dict_metadata
        for key in [k for k in state if k.startswith(_RNG_PREFIX) and k not in stored]:
            del state[key]
        _load(state, path, advice)
        self._check_base(state, path)
        self._apply(state)
        return int(state["train.step"])

    def _check_base(self, state: dict[str, torch.Tensor], path: str) -> None:
        """Refuse to resume adapters onto another frozen base than they were trained on."""
        for name, sums in self.frozen_base.items():
            if not torch.allclose(state[f"base.{name}"], sums, rtol=1e-9, atol=0):
                raise CheckpointError(f"model.init_from: the frozen base is not the one {path} "
                                      f"was trained on ({name} differs); resume with the same "
                                      "model.init_from (and job.seed)")

    def _apply(self, state: dict[str, torch.Tensor]) -> None:
        """Hand the loaded non-parameter values back to their owners (parameters and optimizer
        states were loaded in place)."""
        data = dict(zip(_DATA_FIELDS, (int(v) for v in state["train.data"])))
        self.loader.load_state_dict(data)
        self.scheduler.last_epoch = int(state["train.lr_step"]) - 1
        self.scheduler.step()  # sets each group's lr for the loaded step
        set_rng_state(state, self.device, _rank())
        if self.grad_scaler:
            scale, good_steps = state["train.loss_scale"].tolist()
            self.grad_scaler.load_state_dict({"scale": scale, "good_steps": good_steps})


_RNG_PREFIX = "train.rng."


def rng_state(device: torch.device, rank: int) -> dict[str, torch.Tensor]:
    """This rank's random number generators, keyed by rank (ranks draw different dropout
    masks, and DCP would keep only one copy of a key every rank saves): the CPU's, and the
    accelerator's where ``device`` is one."""
    state = {f"{_RNG_PREFIX}rank{rank}.cpu": torch.get_rng_state()}
    if device.type != "cpu":
        module = torch.get_device_module(device.type)
        state[f"{_RNG_PREFIX}rank{rank}.{device.type}"] = module.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device, rank: int) -> None:
    """Put back what ``rng_state`` stored for this rank (generators it holds no state for are
    left alone)."""
    for key, value in rng_state(device, rank).items():
        if key not in state:
            continue
        if key.endswith(".cpu"):
            torch.set_rng_state(state[key])
        else:
            torch.get_device_module(device.type).set_rng_state(state[key], device)


@contextlib.contextmanager
def _loading(path: str, advice: str = "") -> Iterator[None]:
    """Any failure within (a missing or torn file, a refused pickle, a shape that does not
    fit) becomes a CheckpointError naming the checkpoint folder ``path``."""
    try:
        yield
    except (Exception, CheckpointException) as e:  # DCP's own wraps every rank's failure
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({_first_cause(e)})"
                              f"{advice}") from e


def _load(state: dict[str, torch.Tensor], path: str, advice: str = "") -> None:
    """Fill ``state``'s tensors in place from the checkpoint folder ``path``."""
    with _loading(path, advice):
        dcp.load(state, storage_reader=_SafeReader(path), no_dist=_single())


def _first_cause(error: BaseException) -> str:
    """One line on why a load failed (DCP wraps each rank's error with its traceback)."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


@torch.no_grad()
def _materialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's (lazily built) state with a step at lr 0 on zero gradients, so
    there are tensors of the right shards for the checkpoint to be loaded into."""
    if optimizer.state:
        return
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _single() -> bool:
    """No process group: DCP runs without collectives."""
    return not dist.is_initialized()


class Preemption:
    """SIGTERM or SIGINT (a cluster's preemption, Ctrl-C) asks the run to checkpoint and stop
    after the current step instead of dying mid-step; a second one ends it at once."""

    def __init__(self, device: torch.device) -> None:
        self.device = device  # where the agreement's all-reduce runs (CUDA under nccl)
        self._signalled = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self._signalled:  # a second signal: the run may be stuck, leave the default way
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self._signalled = True

    def requested(self) -> bool:
        """Whether any rank was signalled (all ranks must stop at the same step)."""
        flag = torch.tensor(float(self._signalled), device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)


@torch.no_grad()
def load_model_weights(model_parts: Iterable[nn.Module], path: str,
                       parameters: Callable[[nn.Module], Iterable[tuple[str, torch.Tensor]]]
                       = nn.Module.named_parameters) -> None:
    """Load only the weights of the checkpoint folder ``path`` into the model's parts (any
    layout; each rank passes the parts it holds): all of them, or those that ``parameters``
    yields for a part (e.g. only a LoRA model's base). Stored dtypes are cast to the
    parameters'."""
    state, quantized = {}, []
    for part in model_parts:
        for name, param in parameters(part):
            if is_quantized(param):  # DCP reads the dense weight, then it is quantised
                full = torch.empty(param.shape, dtype=param.dtype, device=local_shard(param)
                                   .device)
                quantized.append((param, full))
                param = full
            state[f"model.{name}"] = param
    _load(state, path)
    for param, full in quantized:
        write_shard(param, full)


def is_checkpoint(path: str) -> bool:
    """Whether ``path`` is a DCP checkpoint folder (it has DCP's .metadata)."""
    return os.path.isfile(os.path.join(path, ".metadata"))
