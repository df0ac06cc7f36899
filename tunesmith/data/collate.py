"""Batches from encoded rows. The loop only sees the dict this returns, so a packing collator can replace
padding without touching the loop.

What lives here: padding, padding-free and packed collators, and the packing plan (`pack_groups`). What must not:
tokenisation or label masking (`tunesmith.data.encode`), the loss. torch is imported inside the functions, never at
module level, so `tunesmith.data` imports without it.
"""
from __future__ import annotations

from tunesmith.data.encode import IGNORE, Encoded


def pad_collate(rows: list[Encoded], pad_id: int, padding_side: str = "right") -> dict:
    """Pad to the longest row. Returns input_ids, attention_mask, labels (unshifted, -100 = not trained) and
    n_tokens: the number of trained (shifted) label positions in the batch, used to normalise the loss.

    rows: B non-empty list of Encoded; padding_side: "left", anything else pads on the right.
    Shapes: input_ids, attention_mask (1 = real token), labels: [B, T] int64, T = the longest row in tokens;
    n_tokens: int. Raises ValueError for an empty `rows`."""
    import torch

    longest = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        sl = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
        ids[i, sl] = torch.tensor(r.input_ids)
        labels[i, sl] = torch.tensor(r.labels)
        mask[i, sl] = 1
    n_tokens = int((labels[:, 1:] != IGNORE).sum())
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "n_tokens": n_tokens,
            **_channels([r.channel for r in rows]), **_images(rows)}


def _images(rows: list[Encoded]) -> dict:
    """{"images": each sequence's picture references (None for a text-only one)} when some row has pictures, else
    {}: tunesmith.data.vision.WithPixels turns them into the vision tower's inputs."""
    images = [r.images for r in rows]
    return {"images": images} if any(images) else {}


def _channels(channels: list) -> dict:
    """{"channels": each sequence's `channel` (None where a row gives none)} when some row gives one, else {}."""
    return {"channels": channels} if any(c is not None for c in channels) else {}


def segments_collate(rows: list[list[tuple[int, Encoded]]], pad_id: int, n_seq: int) -> dict:
    """Padding-free batches: each row is several sequences (`(seq_id, Encoded)` segments) one after another.

    `position_ids` restart at 0 for every segment, so attention never crosses segments (transformers builds the
    block-diagonal mask from them for sdpa/eager and uses flash-attention's varlen kernel on GPU); there is no
    attention_mask. Rows are padded at the end only, where causal attention keeps real tokens from seeing the pads.
    Each segment's first label is ignored so that no sequence is trained to predict the next one's start.
    `seq_ids` tells which sequence each position belongs to; n_tokens counts the same trained positions as
    padding would, so the loss is unchanged.

    Shapes: input_ids, labels, position_ids, seq_ids (-1 on pads): [B, T] int64, T = the longest row's total
    tokens; n_seq: the int passed in (sequences in the batch); n_tokens: int. Raises ValueError for an empty `rows`."""
    import torch

    longest = max(sum(len(e.input_ids) for _, e in row) for row in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), longest), dtype=torch.long)
    seq = torch.full((len(rows), longest), -1, dtype=torch.long)
    channels = [None] * n_seq
    images = []  # the pictures in sequence order (as the placeholders appear in the flattened batch)
    for b, row in enumerate(rows):
        at = 0
        for k, e in row:
            n = len(e.input_ids)
            ids[b, at:at + n] = torch.tensor(e.input_ids)
            labels[b, at + 1:at + n] = torch.tensor(e.labels[1:], dtype=torch.long)
            pos[b, at:at + n] = torch.arange(n)
            seq[b, at:at + n] = k
            channels[k] = e.channel
            images.append(e.images)
            at += n
        pos[b, at:] = torch.arange(longest - at)  # the pads: one more segment of their own, never trained
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "seq_ids": seq, "n_seq": n_seq,
            "n_tokens": int((labels[:, 1:] != IGNORE).sum()), **_channels(channels),
            **({"images": images} if any(images) else {})}


def flat_collate(rows: list[Encoded], pad_id: int = 0) -> dict:
    """--padding_free: the whole batch as one sequence [1, T] (no padding at all).

    T = total tokens of `rows`; sequence ids 0..len(rows)-1 in order; the dict is segments_collate's."""
    return segments_collate([list(enumerate(rows))], pad_id, len(rows))


def pack_groups(lengths: list[int], capacity: int) -> list[list[int]]:
    """--packing: group row indices so that each group's total length fits `capacity` (best-fit decreasing;
    deterministic). A row longer than the capacity gets a group of its own.

    lengths: tokens per row; capacity: tokens per packed row. Returns lists of row indices, each sorted ascending;
    every index appears exactly once."""
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, group index), sorted
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(rooms, (n, -1))
        if k == len(rooms):
            groups.append([i])
            bisect.insort(rooms, (capacity - n, len(groups) - 1))
        else:
            room, g = rooms.pop(k)
            groups[g].append(i)
            bisect.insort(rooms, (room - n, g))
    return [sorted(g) for g in groups]


class PackedCollate:
    """--packing: each unit is a group of rows filling one packed row; a batch of groups is [groups, longest group].
    A class (not a closure) so that DataLoader workers can pickle it."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, groups: list) -> dict:
        """groups: lists of Encoded (one per packed row) -> segments_collate's dict, sequence ids unique per batch."""
        rows, k = [], 0
        for group in groups:
            rows.append([(k + i, r) for i, r in enumerate(group)])
            k += len(group)
        return segments_collate(rows, self.pad_id, k)


class Grouped:
    """A read-only sequence of row groups (packed rows): item k is [rows[i] for i in groups[k]], read from `rows`
    only when a batch asks for it, so packing never holds all rows in memory at once."""

    def __init__(self, rows, groups: list[list[int]]):
        self.rows, self.groups = rows, groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        return [self.rows[i] for i in self.groups[k]]

    def __iter__(self):
        return (self[k] for k in range(len(self)))

