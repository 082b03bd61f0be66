"""The CABS training schedule, free of torch: (seed, epoch, step) -> super-batch -> CABS batch.

Every training step draws an IID super-batch of B samples (without replacement within an epoch:
the epoch's permutation, seeded by (seed, epoch), is cut into consecutive super-batches) and keeps
b = round((1 - f) * B) of them (or, with ``power_of_two``, the largest power of two not above that,
as the reference sizes its batches) with CABS-DM or CABS-FM (:mod:`pipeline.select.cabs`). So every
sample is drawn at most once per epoch, a step's batch depends only on (seed, epoch, step), and
an epoch has N // B steps (or ceil(N / B) with ``drop_last=False``, the last super-batch then
being smaller and keeping round((1 - f) * its size)). Planning a batch order (``iter_plan``,
``plan_batches``) needs only numpy; :mod:`pipeline.select.cabs_sampler` wraps the schedule for
PyTorch data loaders.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline.select.cabs import (
    REFERENCE_CAP,
    CabsResult,
    ConceptTable,
    DmMode,
    batch_size_for,
    select_batch,
)

Method = Literal["dm", "fm"]
ConceptInput = ConceptTable | Sequence[Sequence[int]] | Sequence[Sequence[str]]


def as_concept_table(concepts: ConceptInput, vocabulary: Sequence[str] | None = None) -> ConceptTable:
    """A ConceptTable from a table, integer id lists, or concept-name lists (+ optional vocabulary)."""
    if isinstance(concepts, ConceptTable):
        return concepts
    rows = [list(r) for r in concepts]
    first = next((r[0] for r in rows if r), None)
    if isinstance(first, str) or vocabulary is not None:
        return ConceptTable.from_name_lists(rows, vocabulary)
    return ConceptTable.from_id_lists(rows)


@dataclass(frozen=True)
class PlannedStep:
    """One step: the super-batch drawn and the batch CABS kept from it (dataset indices)."""

    step: int
    epoch: int
    superbatch: np.ndarray  # dataset indices of the super-batch, in draw order
    batch: np.ndarray  # dataset indices kept, in pick order
    result: CabsResult  # positions are into ``superbatch``


class CabsSchedule:
    """The deterministic (seed, epoch, step) -> batch mapping shared by the sampler, the dataset
    wrapper and the planner."""

    def __init__(
        self,
        concepts: ConceptInput,
        superbatch_size: int,
        filter_ratio: float = 0.8,
        method: Method = "dm",
        dm_mode: DmMode = "paper",
        seed: int = 0,
        drop_last: bool = True,
        cap: int = REFERENCE_CAP,
        vocabulary: Sequence[str] | None = None,
        *,
        power_of_two: bool = False,
    ) -> None:
        self.table = as_concept_table(concepts, vocabulary)
        n = self.table.n_rows
        if method not in ("dm", "fm"):
            raise ValueError(f"method must be 'dm' or 'fm', got {method!r}")
        if dm_mode not in ("paper", "reference"):
            raise ValueError(f"dm_mode must be 'paper' or 'reference', got {dm_mode!r}")
        if int(seed) < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        if isinstance(cap, bool) or int(cap) != cap or int(cap) < 1:
            raise ValueError(f"cap must be an integer >= 1, got {cap!r}")
        superbatch_size = int(superbatch_size)
        if superbatch_size < 1:
            raise ValueError(f"super-batch size must be >= 1, got {superbatch_size}")
        if drop_last and superbatch_size > n:
            raise ValueError(
                f"super-batch size {superbatch_size} exceeds the dataset's {n} samples; with drop_last=True no "
                "step would run. Use a smaller super-batch or drop_last=False."
            )
        self.superbatch_size = superbatch_size
        self.filter_ratio = float(filter_ratio)
        self.power_of_two = bool(power_of_two)
        self.batch_size = batch_size_for(superbatch_size, self.filter_ratio, self.power_of_two)
        self.method = method
        self.dm_mode = dm_mode
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.cap = int(cap)
        if method == "dm" and dm_mode == "reference":
            self.table.alphabetical_rank()  # cached once here, shared by every step's super-batch
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    @property
    def steps_per_epoch(self) -> int:
        n, bs = self.table.n_rows, self.superbatch_size
        return n // bs if self.drop_last else -(-n // bs)

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.table.n_rows)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def step(self, step: int) -> PlannedStep:
        """The batch of global step ``step`` (epoch = step // steps_per_epoch)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, k = divmod(int(step), self.steps_per_epoch)
        return self.epoch_step(epoch, k, global_step=step)

    def epoch_step(self, epoch: int, k: int, global_step: int | None = None) -> PlannedStep:
        if not 0 <= k < self.steps_per_epoch:
            raise ValueError(f"step {k} is outside the epoch's {self.steps_per_epoch} steps")
        rows = self.permutation(epoch)[k * self.superbatch_size:(k + 1) * self.superbatch_size]
        b = (self.batch_size if rows.size == self.superbatch_size
             else batch_size_for(rows.size, self.filter_ratio, self.power_of_two))
        result = select_batch(self.table.take(rows), b, self.method, self.dm_mode, cap=self.cap,
                              seed=np.random.default_rng([self.seed, int(epoch), int(k)]))
        step = epoch * self.steps_per_epoch + k if global_step is None else global_step
        return PlannedStep(step, epoch, rows, rows[result.indices], result)


def iter_plan(
    concepts: ConceptInput,
    mode: Method = "dm",
    filter_ratio: float = 0.8,
    superbatch: int = 20_480,
    steps: int = 1,
    seed: int = 0,
    *,
    dm_mode: DmMode = "paper",
    cap: int = REFERENCE_CAP,
    drop_last: bool = True,
    start_step: int = 0,
    vocabulary: Sequence[str] | None = None,
    power_of_two: bool = False,
) -> Iterator[PlannedStep]:
    """The planned steps ``start_step .. start_step + steps - 1`` (epochs roll over as in training)."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    sched = CabsSchedule(concepts, superbatch, filter_ratio, mode, dm_mode, seed, drop_last, cap, vocabulary,
                         power_of_two=power_of_two)
    for step in range(start_step, start_step + steps):
        yield sched.step(step)


def plan_batches(
    concepts: ConceptInput,
    mode: Method = "dm",
    filter_ratio: float = 0.8,
    superbatch: int = 20_480,
    steps: int = 1,
    seed: int = 0,
    *,
    dm_mode: DmMode = "paper",
    cap: int = REFERENCE_CAP,
    drop_last: bool = True,
    start_step: int = 0,
    vocabulary: Sequence[str] | None = None,
    power_of_two: bool = False,
) -> Iterator[tuple[int, int, int, float]]:
    """Rows ``(step, position, sample_index, gain)`` of a CABS batch plan, in pick order.

    ``sample_index`` indexes ``concepts`` (the dataset order); ``position`` is the rank within
    the step's batch; ``gain`` is the score at pick time (FM: instance count; NaN for samples the
    reference mode took by random fill or padding). The same (concepts, arguments) always give
    the same plan, and it equals what :class:`CabsBatchSampler` yields for those steps.
    """
    for planned in iter_plan(concepts, mode, filter_ratio, superbatch, steps, seed, dm_mode=dm_mode, cap=cap,
                             drop_last=drop_last, start_step=start_step, vocabulary=vocabulary,
                             power_of_two=power_of_two):
        for pos, (i, g) in enumerate(zip(planned.batch.tolist(), planned.result.gains.tolist())):
            yield planned.step, pos, i, g
