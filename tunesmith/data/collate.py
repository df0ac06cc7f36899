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
