"""Which micro-batches each optimiser step trains on, and in what order: the data side of the loop.

Rows in a sequence are cut into seeded per-epoch batches of indices (`epoch_batches`: the same for the same --seed +
epoch; grouped by length with --group_by_length), every rank taking its slice of each global batch
(distributed.rank_batches) and a DataLoader collating them (`loader_batches`). A stream without a length (--streaming's data.stream.StreamingRows, GRPO's rollouts) is cut the
same way as it is read (`stream_batches`). `step_batches` groups either into `gradient_accumulation_steps`
micro-batches per step, from the epoch's `batches_done` on, so a resumed run reads on where it stopped. `run` here is
the loop's frozen loop.Run; `state` its checkpoint.TrainState.
"""
from __future__ import annotations

import sys
from collections.abc import Sized
from itertools import islice

from tunesmith.errors import TunesmithError


def epoch_batches(n_rows: int, batch_size: int, seed: int, shuffle: bool, lengths=None) -> list[list[int]]:
    """The micro-batches of one epoch: a seeded permutation cut into batches (the same for the same seed). With the
    rows' `lengths` (tokens; --group_by_length), transformers' length-grouped order instead
    (get_length_grouped_indices, as ms-swift's BatchSamplerShard: a seeded permutation cut into mega-batches of up to
    50 batches, each sorted by length, the longest batch first), so that a batch holds rows of similar length."""
    import torch

    if shuffle and lengths is not None:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        order = get_length_grouped_indices(lengths, batch_size, generator=torch.Generator().manual_seed(seed))
    elif shuffle:
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    else:
        order = list(range(n_rows))
    return [order[i:i + batch_size] for i in range(0, n_rows, batch_size)]


def step_batches(run, state):
    """The rest of the current epoch, `gradient_accumulation_steps` micro-batches (on the device) per step, until
    the epoch or the training ends. Every rank cuts the same seeded global batches into its own slices; a stream's
    batches are read as they are needed (`stream_batches`)."""
    optim = run.optim
    it = loader_batches(run, state) if isinstance(run.train_rows, Sized) else stream_batches(run, state)
    while state.global_step < state.total_steps:
        micro = list(islice(it, optim.gradient_accumulation_steps))
        if not micro:
            return
        yield [to_device(b, run.accelerator.device) for b in micro]


def loader_batches(run, state):
    """Rows in a sequence: the epoch's remaining micro-batches of this rank (from `batches_done` on), collated by a
    DataLoader over index lists of the seeded permutation."""
    import torch
    from torch.utils.data import DataLoader

    from tunesmith.train import distributed as D

    optim, par = run.optim, run.par
    # --group_by_length: each unit's tokens (rows that cannot say theirs keep the plain shuffled order)
    lengths = run.train_rows.lengths() if optim.group_by_length and hasattr(run.train_rows, "lengths") else None
    batches, dropped = D.rank_batches(epoch_batches(len(run.train_rows), optim.per_device_train_batch_size * par.world,
                                                    optim.seed + state.epoch, run.shuffle, lengths),
                                      par.world, par.rank)
    if dropped and state.epoch == 0 and par.main:
        print(f"[tunesmith] {dropped} row(s) of the last batch of each epoch are skipped: fewer rows than the "
              f"{par.world} processes", file=sys.stderr)
    loader = DataLoader(batches[state.batches_done:], batch_size=None,
                        collate_fn=_Collate(run.train_rows, run.collate),
                        num_workers=optim.dataloader_num_workers or 0,
                        generator=torch.Generator().manual_seed(optim.seed), pin_memory=torch.cuda.is_available())
    return iter(loader)


def stream_batches(run, state):
    """A stream (--streaming): this rank's micro-batches of the epoch, collated in this process as they are read.
    The pass's units (shuffled within buffers with --seed + epoch) are cut into global batches of per-device batch
    × processes, each rank taking its slice as `epoch_batches` + `rank_batches` cut a sequence (with every slice
    full: every world-th per-device batch). A resumed run skips the `batches_done` already trained: the stream's
    `epoch(seed, shuffle, skip_units)` skips their units (a --streaming pass reads them again; GRPO's rollouts do
    not generate whole rounds skipped). Raises TunesmithError when a whole pass gives this process no batch."""
    optim, par = run.optim, run.par
    size = optim.per_device_train_batch_size * par.world
    # global batch k is units [k·size, (k+1)·size): a resumed run starts after the batches already trained
    units = run.train_rows.epoch(optim.seed + state.epoch, run.shuffle, state.batches_done * size)
    n = 0
    for batch in _rank_slices(units, size, par.world, par.rank):
        n += 1
        yield run.collate(batch)
    if n == 0 and state.batches_done == 0:
        raise TunesmithError(f"the streamed training data gave no batch to each of {par.world} processes")


def _rank_slices(units, size: int, world: int, rank: int):
    """This rank's slice of each global batch of `size` units read from `units`."""
    from tunesmith.train import distributed as D

    while True:
        batch = list(islice(units, size))
        if not batch:
            return
        for idx in D.rank_batches([list(range(len(batch)))], world, rank)[0]:
            yield [batch[i] for i in idx]


class _Collate:
    """Picklable collate for DataLoader workers: a list of row indices -> a batch."""

    def __init__(self, rows, collate):
        self.rows, self.collate = rows, collate

    def __call__(self, idx):
        return self.collate([self.rows[i] for i in idx])


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on `device` (other values as they are)."""
    return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}
