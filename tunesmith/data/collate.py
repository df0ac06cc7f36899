"""Batches from encoded rows. The loop only sees the dict this returns, so a packing collator can replace
padding without touching the loop."""
from __future__ import annotations

from tunesmith.data.encode import IGNORE, Encoded


def pad_collate(rows: list[Encoded], pad_id: int, padding_side: str = "right") -> dict:
    """Pad to the longest row. Returns input_ids, attention_mask, labels (unshifted, -100 = not trained) and
    n_tokens: the number of trained (shifted) label positions in the batch, used to normalise the loss."""
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
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "n_tokens": n_tokens}


def flat_collate(rows: list[Encoded]) -> dict:
    """Padding-free: the rows concatenated into one sequence [1, T]. `position_ids` restart at 0 for every row, so
    attention never crosses rows (transformers builds the block-diagonal mask from them for sdpa/eager, and uses
    flash-attention's varlen kernel on GPU), and each row's first label is ignored so that no row is trained to
    predict the next one's start. `seq_ids` says which row each position came from. The loss is the same as with
    padding: n_tokens counts the same trained positions."""
    import torch

    ids, labels, pos, seq = [], [], [], []
    for k, r in enumerate(rows):
        n = len(r.input_ids)
        ids += r.input_ids
        labels += [IGNORE] + list(r.labels[1:])
        pos += range(n)
        seq += [k] * n
    labels_t = torch.tensor([labels])
    return {"input_ids": torch.tensor([ids]), "labels": labels_t, "position_ids": torch.tensor([pos]),
            "seq_ids": torch.tensor([seq]), "n_seq": len(rows), "n_tokens": int((labels_t[:, 1:] != IGNORE).sum())}


def pack_groups(lengths: list[int], capacity: int) -> list[list[int]]:
    """--packing: group row indices so that each group's total length fits `capacity` (best-fit decreasing;
    deterministic). A row longer than the capacity gets a group of its own."""
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
    """Collate for --packing: each unit is a group of rows; a batch of groups becomes one padding-free sequence.
    A class (not a closure) so that DataLoader workers can pickle it."""

    def __init__(self, flat):
        self.flat = flat

    def __call__(self, groups: list) -> dict:
        return self.flat([row for group in groups for row in group])
