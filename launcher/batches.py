"""Training batches from prepared shards: this rank's share, endless over epochs, resumable."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from macformer.errors import MacformerError
from pipelines.reader import ShardReader


def _pad(rows: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def collate(samples: list[dict[str, np.ndarray]], task: str, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Causal LM: whole windows as input_ids and labels (the model shifts). Classification: padded
    input_ids with attention_mask, labels, and the second document for retrieval pairs."""
    if task == "causal_lm":
        ids = torch.as_tensor(np.stack([s["input_ids"] for s in samples]), dtype=torch.long)
        return {"input_ids": ids, "labels": ids}
    ids, mask = _pad([s["input_ids"] for s in samples], pad_id)
    batch = {"input_ids": ids, "attention_mask": mask,
             "labels": torch.as_tensor([int(s["label"]) for s in samples], dtype=torch.long)}
    if "pair_input_ids" in samples[0]:
        batch["pair_input_ids"], batch["pair_attention_mask"] = _pad([s["pair_input_ids"] for s in samples], pad_id)
    return batch


class TrainBatches:
    """Batches of `batch_size` samples for one rank, epoch after epoch. `state_dict()` after a step
    resumes at exactly the next batch."""

    def __init__(self, reader: ShardReader, task: str, batch_size: int) -> None:
        self.reader, self.task, self.batch_size = reader, task, batch_size
        if len(reader) < batch_size:
            raise MacformerError(f"this rank holds {len(reader)} samples, fewer than one batch of {batch_size}; "
                             "use more data, fewer workers or a smaller micro_batch_size")

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            samples = []
            for sample in self.reader:
                samples.append(sample)
                if len(samples) == self.batch_size:
                    yield collate(samples, self.task)
                    samples = []
            # The epoch's incomplete tail is skipped; the next epoch reshuffles.
            self.reader.set_epoch(self.reader.epoch + 1)

    def state_dict(self) -> dict[str, int]:
        return self.reader.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.reader.load_state_dict(state)


def eval_batches(reader: ShardReader, task: str, batch_size: int, count: int) -> list[dict[str, torch.Tensor]]:
    """The first `count` batches in fixed order: the same evaluation set at every evaluation."""
    batches, samples = [], []
    for sample in reader.samples(epoch=0):
        samples.append(sample)
        if len(samples) == batch_size:
            batches.append(collate(samples, task))
            samples = []
            if len(batches) == count:
                break
    return batches
