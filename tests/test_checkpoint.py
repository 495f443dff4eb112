"""Checkpoint safety without a cluster: the driver's static check and the workers' weights-only loading
(the end-to-end refusal of a crafted checkpoint is in test_train.py)."""

import os

import pyarrow.fs as pafs
import pytest
import torch
from conftest import RunsCode

from launcher.checkpoint import CheckpointError, _weights_only_loading, check_run_checkpoints


@pytest.fixture
def run_directory(tmp_path):
    """A run directory as Ray Train leaves it: checkpoints holding tensors and DeepSpeed's own types."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    engine = tmp_path / "run" / "checkpoint_000001" / "engine"
    engine.mkdir(parents=True)
    torch.save({"module": {"weight": torch.ones(2)}, "zero_stage": ZeroStageEnum(2)},
               engine / "mp_rank_00_model_states.pt")
    torch.save({"reader": {"position": 3}}, engine.parent / "worker-0.pt")
    return tmp_path / "run"


def test_the_driver_refuses_a_checkpoint_that_would_run_code(run_directory, tmp_path) -> None:
    states = run_directory / "checkpoint_000001" / "engine" / "mp_rank_00_model_states.pt"
    for filesystem, root in ((pafs.LocalFileSystem(), str(run_directory)),
                             pafs.FileSystem.from_uri(run_directory.as_uri())):
        check_run_checkpoints(filesystem, root)  # what the trainer writes passes
    marker = tmp_path / "pwned"
    torch.save({"module": RunsCode(marker)}, states)
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt holds a pickled posix\.system"):
        check_run_checkpoints(pafs.LocalFileSystem(), str(run_directory))
    states.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a torch checkpoint"):
        check_run_checkpoints(pafs.LocalFileSystem(), str(run_directory))
    assert not marker.exists()
    check_run_checkpoints(pafs.LocalFileSystem(), str(tmp_path / "missing"))  # nothing saved yet: nothing to refuse


def test_worker_loading_is_weights_only_even_when_a_loader_asks_otherwise(run_directory, tmp_path) -> None:
    states = run_directory / "checkpoint_000001" / "engine" / "mp_rank_00_model_states.pt"
    with _weights_only_loading(run_directory):  # DeepSpeed's own types load
        assert torch.load(states, weights_only=False)["zero_stage"] == 2
    marker = tmp_path / "pwned"
    torch.save({"module": RunsCode(marker)}, states)
    with pytest.raises(CheckpointError, match=r"holds a pickled posix\.system"), _weights_only_loading(run_directory):
        torch.load(states, weights_only=False)  # as DeepSpeed's load_checkpoint asks
    assert not marker.exists() and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
