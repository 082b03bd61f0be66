"""CABS in a PyTorch input pipeline: a batch sampler and an IterableDataset wrapper.

Both follow :class:`pipeline.select.cabs_schedule.CabsSchedule`, the deterministic
(seed, epoch, step) -> batch mapping that the planner (``iter_plan``, ``plan_batches``) uses too.
This module imports torch and numpy only (no apache_beam, no prefect), so a training job can use
it without the pipeline's orchestration dependencies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

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


class CabsBatchSampler(Sampler[list[int]]):
    """Yields CABS batches (lists of dataset indices): pass it as ``batch_sampler=`` to a DataLoader.

    One ``iter()`` covers ``epochs`` epochs starting at the epoch set with :meth:`set_epoch`
    (default 0), like ``DistributedSampler``: call ``set_epoch(e)`` before each epoch so that
    each epoch draws different super-batches. ``last_result`` holds the CabsResult of the batch
    yielded last (zero-gain, fill and padding counts for logging).
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
    ) -> None:
        if int(epochs) < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self.schedule = CabsSchedule(concepts, superbatch_size, filter_ratio, method, dm_mode, seed, drop_last, cap,
                                     vocabulary)
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
                yield planned.batch.tolist()


class CabsIterableDataset(IterableDataset):
    """Yields whole CABS batches of ``dataset`` items (use with ``DataLoader(batch_size=None)``).

    The concept lists come from ``concepts`` or, when that is None, from ``dataset.concepts``
    (one list per item, ids or names). With several DataLoader workers, worker w of W yields the
    batches w, w + W, ... so every batch is produced exactly once. Each batch is
    ``collate_fn([dataset[i] for i in batch])`` (the plain list when ``collate_fn`` is None).
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
    ) -> None:
        if concepts is None:
            concepts = getattr(dataset, "concepts", None)
            if concepts is None:
                raise TypeError(
                    f"{type(dataset).__name__} has no 'concepts' attribute; pass concepts= (one concept list per item)"
                )
        self.dataset = dataset
        self.sampler = CabsBatchSampler(concepts, superbatch_size, filter_ratio, method, dm_mode, seed, epochs,
                                        drop_last, cap, vocabulary)
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
                    items = [self.dataset[i] for i in sched.epoch_step(epoch, k).batch.tolist()]
                    yield self.collate_fn(items) if self.collate_fn is not None else items
                j += 1
