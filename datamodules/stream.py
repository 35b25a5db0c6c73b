"""An infinite training stream whose item k is a pure function of (seed, k).

Because nothing depends on iteration history, a run resumed from a checkpoint at step s simply
starts the stream at the sample index of step s and sees exactly the batches an uninterrupted
run would have seen. Under DDP each rank takes its own slice of every global batch; with
DataLoader workers each worker produces whole batches in turn.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

HOST_KEYS = ("index", "flip")  # item entries the training step reads on the host: which item, flipped or not


class IndexedStream(IterableDataset):
    def __init__(self, make_item: Callable[[int], dict], batch_size: int, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.make_item = make_item
        self.batch_size = batch_size
        self.start_batch = start_batch
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start_batch + worker
        while True:
            first = (step * self.world_size + self.rank) * self.batch_size
            for k in range(first, first + self.batch_size):
                yield self.make_item(k)
            step += workers


def collate(items: list[dict]) -> dict:
    """torch's default collate, except that item numbers and flips stay host lists: as tensors they would travel
    to the GPU with the batch, and reading them back there makes the host wait for the GPU's queue every step."""
    batch = default_collate([{k: v for k, v in item.items() if k not in HOST_KEYS} for item in items])
    batch.update({k: [item[k] for item in items] for k in HOST_KEYS if k in items[0]})
    return batch


def pass_order_index(seed: int, k: int, n: int) -> int:
    """Which of n items sample k is, visiting the items in a fresh random order each pass."""
    order = torch.randperm(n, generator=item_generator(seed, -1 - k // n))
    return int(order[k % n])


def item_generator(seed: int, index: int) -> torch.Generator:
    """A generator for sample `index` of a stream seeded by `seed`."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2 ** 63))


def stream_position(trainer) -> tuple[int, int, int]:
    """(first batch, rank, world size) for a stream feeding `trainer`: a resumed run starts at the
    batch after its checkpoint's last one. Batches are counted from optimizer steps, unless the module
    counts them itself as `batches_done` (one whose batches take a varying number of optimizer steps,
    such as StyleDiffusion's Algorithm 1)."""
    if trainer is None:
        return 0, 0, 1
    done = getattr(getattr(trainer, "lightning_module", None), "batches_done", None)
    first = done if done is not None else trainer.global_step * trainer.accumulate_grad_batches
    return first, trainer.global_rank, trainer.world_size
