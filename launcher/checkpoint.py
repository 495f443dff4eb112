"""A training checkpoint, saved and restored side by side so that what is saved is what is restored:
the DeepSpeed engine (weights with the feature maps' redraw counters, optimizer, scheduler), each
rank's data position and RNG states (dropout continues as if never stopped), and the trainer's
step and MLflow run id. Resuming from it reproduces the uninterrupted run step for step.

Files are loaded as tensors and plain data only (torch's weights_only), allow-listing exactly the
DeepSpeed types its checkpoints hold: a checkpoint that names anything else was not written by this
trainer and is refused, since unpickling it could run code in every worker."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from macformer.errors import MacformerError

ENGINE_TAG = "engine"
TRAINER_FILE = "trainer_state.json"


class CheckpointError(MacformerError):
    pass


@dataclass(frozen=True)
class TrainerState:
    step: int
    run_id: str | None


def _worker_file(rank: int) -> str:
    return f"worker-{rank}.pt"


def _deepspeed_checkpoint_types() -> list[type]:
    """The non-tensor classes DeepSpeed pickles into its checkpoints (ZeRO 0-3, fp32/bf16/fp16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def _weights_only_loading(directory: Path) -> Iterator[None]:
    """Every torch.load inside (DeepSpeed's included, which asks for weights_only=False) loads with
    weights_only=True and DeepSpeed's own types allowed; anything else is refused in one line."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_checkpoint_types()):
            yield
    except pickle.UnpicklingError as error:
        named = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f"a pickled {named.group(1)}" if named else "a pickled object"
        raise CheckpointError(f"checkpoint {directory} holds {what}, which this trainer never saves; refusing to "
                              "load it (unpickling could run code): restore the checkpoint from a trusted copy or "
                              "start a new run_name") from None
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def check_run_checkpoints(filesystem, run_directory: str) -> None:
    """Refuse, on the driver and before any worker starts, a run whose checkpoints name a pickled
    global this trainer never saves (read statically: nothing in them runs). The workers' weights-only
    loading stays the guarantee; this makes the refusal one line that costs no worker start."""
    import pyarrow.fs as pafs

    selector = pafs.FileSelector(run_directory, recursive=True, allow_not_found=True)
    files = sorted(info.path for info in filesystem.get_file_info(selector)
                   if info.type == pafs.FileType.File and info.path.endswith(".pt")
                   and "/checkpoint_" in info.path[len(run_directory):])
    with torch.serialization.safe_globals(_deepspeed_checkpoint_types()):
        for path in files:
            with filesystem.open_input_file(path) as opened:
                try:
                    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(opened)
                except (ValueError, RuntimeError) as error:
                    raise CheckpointError(f"checkpoint file {path} is not a torch checkpoint ({error}); restore "
                                          "the run directory from a trusted copy or start a new run_name") from None
            if unsafe:
                raise CheckpointError(f"checkpoint file {path} holds a pickled {sorted(unsafe)[0]}, which this "
                                      "trainer never saves; refusing to load it (unpickling could run code): "
                                      "restore the checkpoint from a trusted copy or start a new run_name")


def _rng_states() -> dict[str, Any]:
    state, keys, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": [state, keys.tolist(), position, has_gauss, gauss]}


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])
    state, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((state, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))


def save(directory: Path, engine, reader_state: dict[str, int], trainer: TrainerState, rank: int) -> None:
    """Write this rank's part of the checkpoint into `directory` (every rank calls it)."""
    engine.save_checkpoint(str(directory), tag=ENGINE_TAG)  # every rank: ZeRO partitions live on each
    torch.save({"reader": reader_state, "rng": _rng_states()}, directory / _worker_file(rank))
    if rank == 0:
        (directory / TRAINER_FILE).write_text(json.dumps({"step": trainer.step, "run_id": trainer.run_id}))


def restore(directory: Path, engine, rank: int) -> tuple[TrainerState, dict[str, int]]:
    """Load the engine and this rank's RNG states; returns the trainer state and this rank's data
    position (for the reader's load_state_dict)."""
    with _weights_only_loading(directory):
        engine.load_checkpoint(str(directory), tag=ENGINE_TAG)
        worker_path = directory / _worker_file(rank)
        if worker_path.is_file():
            worker = torch.load(worker_path, weights_only=True)
            _set_rng_states(worker["rng"])
            reader_state = worker["reader"]
        else:  # written before RNG states were saved: the data position only
            reader_state = json.loads((directory / f"reader-{rank}.json").read_text())
    trainer = json.loads((directory / TRAINER_FILE).read_text())
    return TrainerState(int(trainer["step"]), trainer["run_id"]), reader_state
