"""CABS in a PyTorch input pipeline: a batch sampler and an IterableDataset wrapper.

Both follow :class:`pipeline.select.cabs_schedule.CabsSchedule`, the deterministic
(seed, epoch, step) -> batch mapping that the planner (``iter_plan``, ``plan_batches``) uses too.
This module imports torch and numpy only (no apache_beam, no prefect), so a training job can use
it without the pipeline's orchestration dependencies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, Sampler, get_worker_info

from pipeline.select.cabs import REFERENCE_CAP, CabsResult, DmMode
from pipeline.select.cabs_schedule import (  # noqa: F401 - the planner is importable from here too
    CabsSchedule,
    ConceptInput,
    Method,
    PlannedStep,
    as_concept_table,
    iter_plan,
    plan_batches,
)


def _distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)``: as given, else from an initialised torch.distributed, else (0, 1)."""
    if world_size is None or rank is None:
        import torch.distributed as dist

        live = dist.is_available() and dist.is_initialized()
        world_size = world_size if world_size is not None else (dist.get_world_size() if live else 1)
        rank = rank if rank is not None else (dist.get_rank() if live else 0)
    world_size, rank = int(world_size), int(rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    return rank, world_size


def rank_share(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s part of a global CABS batch: contiguous, sizes differ by at most one."""
    return np.array_split(batch, world_size)[rank]


class CabsBatchSampler(Sampler[list[int]]):
    """Yields CABS batches (lists of dataset indices): pass it as ``batch_sampler=`` to a DataLoader.

    One ``iter()`` covers ``epochs`` epochs starting at the epoch set with :meth:`set_epoch`
    (default 0), like ``DistributedSampler``: call ``set_epoch(e)`` before each epoch so that
    each epoch draws different super-batches. ``last_result`` holds the CabsResult of the batch
    yielded last (zero-gain, fill and padding counts for logging).

    Data-parallel training (``rank`` / ``world_size``, read from torch.distributed when it is
    initialised and they are not given): CABS curates the *global* batch — the samples whose
    averaged gradient makes one optimiser step — so every rank computes the same schedule from
    the same seed and takes its own contiguous slice of each step's batch. The ranks' slices are
    disjoint and together are exactly the single-process batch; every rank yields the same
    number of steps, as DDP requires. ``batch_size`` is the global batch; a rank gets
    ``batch_size // world_size`` or one more.
    """

    def __init__(
        self,
        concepts: ConceptInput,
        superbatch_size: int,
        filter_ratio: float = 0.8,
        method: Method = "dm",
        dm_mode: DmMode = "paper",
        seed: int = 0,
        epochs: int = 1,
        drop_last: bool = True,
        cap: int = REFERENCE_CAP,
        vocabulary: Sequence[str] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if int(epochs) < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self.schedule = CabsSchedule(concepts, superbatch_size, filter_ratio, method, dm_mode, seed, drop_last, cap,
                                     vocabulary)
        self.rank, self.world_size = _distributed(rank, world_size)
        if self.schedule.batch_size < self.world_size:
            raise ValueError(f"a CABS batch of {self.schedule.batch_size} cannot be shared by {self.world_size} ranks")
        self.epochs = int(epochs)
        self.epoch = 0
        self.last_result: CabsResult | None = None

    @property
    def batch_size(self) -> int:
        return self.schedule.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.epochs * self.schedule.steps_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        for epoch in range(self.epoch, self.epoch + self.epochs):
            for k in range(self.schedule.steps_per_epoch):
                planned = self.schedule.epoch_step(epoch, k)
                self.last_result = planned.result
                yield rank_share(planned.batch, self.rank, self.world_size).tolist()


class CabsIterableDataset(IterableDataset):
    """Yields whole CABS batches of ``dataset`` items (use with ``DataLoader(batch_size=None)``).

    The concept lists come from ``concepts`` or, when that is None, from ``dataset.concepts``
    (one list per item, ids or names). With several DataLoader workers, worker w of W yields the
    batches w, w + W, ... so every batch is produced exactly once. Each batch is
    ``collate_fn([dataset[i] for i in batch])`` (the plain list when ``collate_fn`` is None).
    Under data-parallel training each rank yields its slice of every global batch, as
    :class:`CabsBatchSampler` does (``rank`` / ``world_size``).
    """

    def __init__(
        self,
        dataset: Any,
        superbatch_size: int,
        filter_ratio: float = 0.8,
        method: Method = "dm",
        dm_mode: DmMode = "paper",
        seed: int = 0,
        epochs: int = 1,
        drop_last: bool = True,
        cap: int = REFERENCE_CAP,
        concepts: ConceptInput | None = None,
        vocabulary: Sequence[str] | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if concepts is None:
            concepts = getattr(dataset, "concepts", None)
            if concepts is None:
                raise TypeError(
                    f"{type(dataset).__name__} has no 'concepts' attribute; pass concepts= (one concept list per item)"
                )
        self.dataset = dataset
        self.sampler = CabsBatchSampler(concepts, superbatch_size, filter_ratio, method, dm_mode, seed, epochs,
                                        drop_last, cap, vocabulary, rank, world_size)
        if len(dataset) != self.sampler.schedule.table.n_rows:
            raise ValueError(f"dataset has {len(dataset)} items but {self.sampler.schedule.table.n_rows} concept lists")
        self.collate_fn = collate_fn

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        sched = self.sampler.schedule
        j = 0
        for epoch in range(self.sampler.epoch, self.sampler.epoch + self.sampler.epochs):
            for k in range(sched.steps_per_epoch):
                if j % n_workers == worker:
                    batch = rank_share(sched.epoch_step(epoch, k).batch, self.sampler.rank, self.sampler.world_size)
                    items = [self.dataset[i] for i in batch.tolist()]
                    yield self.collate_fn(items) if self.collate_fn is not None else items
                j += 1
