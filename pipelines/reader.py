"""Read prepared shards for training: a disjoint share per rank, a deterministic shuffle per
(seed, epoch), and resumption from a saved position without repeating or skipping a sample."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from pipelines import storage
from pipelines.errors import PipelineError
from pipelines.shards import load_manifest, read_table, verify_shard


class ShardReader(IterableDataset):
    """Samples of a prepared dataset (a dict of numpy arrays per row) for one rank of `world_size`.

    Epoch order: shards in a permutation drawn from (seed, epoch), rows within each shard in their
    own permutation (one shard in memory at a time). Global position g of that order belongs to rank
    g % world_size, so ranks are disjoint and together cover every row. `position` counts the
    samples this rank has yielded in the current epoch; `state_dict()` / `load_state_dict()` resume
    exactly there. Shard checksums are verified the first time each shard is opened. `split` selects
    one split of a task dataset (train, valid, test). `manifest`: the dataset's manifest if the
    caller has read it already.
    """

    def __init__(self, directory: str | Path, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, verify: bool = True, split: str | None = None,
                 manifest: dict[str, Any] | None = None) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise PipelineError(f"rank {rank} is outside world size {world_size}; use 0 <= rank < world_size")
        self.directory = directory
        self.filesystem, self.root = storage.resolve(directory)
        self.manifest = load_manifest(directory) if manifest is None else manifest
        self.rank, self.world_size, self.seed, self.shuffle, self.verify = rank, world_size, seed, shuffle, verify
        shards = self.manifest["shards"]
        self.shards = [i for i, entry in enumerate(shards) if split is None or entry.get("split") == split]
        if not self.shards:
            available = sorted({str(entry.get("split")) for entry in shards})
            raise PipelineError(f"{self.directory} has no split {split!r} (splits: {', '.join(available)})")
        self.rows = [int(shards[i]["rows"]) for i in self.shards]
        self.epoch, self.position = 0, 0
        self._verified: set[int] = set()

    @property
    def total_rows(self) -> int:
        return sum(self.rows)

    def __len__(self) -> int:
        """Samples this rank sees per epoch."""
        return len(range(self.rank, self.total_rows, self.world_size))

    def _generator(self, *salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.seed, self.epoch, *salt)) & (2**63 - 1))

    def _shard_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.rows)))
        return torch.randperm(len(self.rows), generator=self._generator(-1)).tolist()

    def _load(self, position: int) -> dict[str, Any]:
        index = self.shards[position]
        entry = self.manifest["shards"][index]
        path = verify_shard(self.directory, entry) if self.verify and index not in self._verified else \
            storage.join(self.root, entry["path"])
        self._verified.add(index)
        try:
            table = read_table(path, self.filesystem)
        except Exception as error:
            raise PipelineError(f"shard {path} cannot be read ({str(error).splitlines()[0]}); "
                                "re-run prepare --overwrite") from None
        return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}

    def samples(self, epoch: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """This rank's samples of `epoch` from its `start`-th one on."""
        self.epoch = epoch
        offset, skipped = 0, 0
        for shard in self._shard_order():
            count = self.rows[shard]
            first = (self.rank - offset) % self.world_size  # first local row whose global position is ours
            local = np.arange(first, count, self.world_size)
            offset += count
            if skipped + len(local) <= start:
                skipped += len(local)
                continue
            local = local[start - skipped:] if start > skipped else local
            skipped = start
            order = (torch.randperm(count, generator=self._generator(shard)).numpy() if self.shuffle
                     else np.arange(count))
            columns = self._load(shard)
            for row in order[local]:
                yield {name: values[row] for name, values in columns.items()}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for sample in self.samples(self.epoch, self.position):
            self.position += 1
            yield sample

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (state["seed"], state["world_size"], state["rank"]) != (self.seed, self.world_size, self.rank):
            raise PipelineError("reader state was saved with another seed, rank or world size; "
                                "resume with the same ones")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
