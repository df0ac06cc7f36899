"""A base model's identity, for telling whether two processes hold the same model (GRPO's trainer and its rollout
server): the config fields that define the architecture and a cheap fingerprint of the weights — float64 sums of a
few fixed rows of the input embedding, the same whether the model is loaded in float32 or bfloat16 (within a
relative tolerance), different for two checkpoints of the same shape. No torch import at module level."""
from __future__ import annotations

from typing import Optional

CONFIG_FIELDS = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "intermediate_size", "vocab_size")
ROWS = (0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144)  # the embedding rows summed (those below its row count)
TOLERANCE = 1e-2  # a row's sums agree within this fraction of the row's absolute sum (bf16 vs fp32 loads)


def _embedding(model):
    """The base input-embedding weight under peft wrappers (a LoRA embedding layer, modules_to_save), or None."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get is not None else None
    if emb is None:
        return None
    emb = getattr(emb, "original_module", emb)
    emb = getattr(emb, "base_layer", emb)
    return getattr(emb, "weight", None)


def model_identity(model) -> dict:
    """{"config": {field: value} of CONFIG_FIELDS present in the model's config, "fingerprint": [[row, sum, abs
    sum]...] of ROWS of the input embedding (absent when there is none)}."""
    import torch

    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config  # a vision-language model's language part
    fields = {}
    for name in CONFIG_FIELDS:
        value = getattr(config, name, None) if name in ("architectures", "model_type") else getattr(text, name, None)
        if value is not None:
            fields[name] = list(value) if isinstance(value, (list, tuple)) else value
    out = {"config": fields}
    weight = _embedding(model)
    if weight is not None and weight.dim() == 2 and weight.device.type != "meta":
        with torch.no_grad():
            rows = [r for r in ROWS if r < weight.shape[0]]
            picked = weight[rows].detach().to("cpu", torch.float64)
            out["fingerprint"] = [[r, float(picked[i].sum()), float(picked[i].abs().sum())]
                                  for i, r in enumerate(rows)]
    return out


def identity_difference(mine: dict, theirs: dict) -> Optional[str]:
    """Why two identities are not the same model, in a few words, or None when they agree on every field both
    have (a fingerprint compares only when both have one)."""
    a, b = mine.get("config") or {}, theirs.get("config") or {}
    for name in CONFIG_FIELDS:
        if name in a and name in b and a[name] != b[name]:
            return f"{name} {b[name]} there, {a[name]} here"
    fa, fb = mine.get("fingerprint"), theirs.get("fingerprint")
    if fa and fb:
        rows = {int(r): (s, m) for r, s, m in fb}
        for r, s, m in fa:
            if int(r) in rows:
                s2, m2 = rows[int(r)]
                if abs(s - s2) > TOLERANCE * max(m, m2) + 1e-6:
                    return f"the weights differ (input-embedding row {r} sums to {s2:.6g} there, {s:.6g} here)"
    return None


def tokenizer_identity(tok) -> dict:
    """{"vocab_size": the tokenizer's length, "tokenizer_fingerprint": a short hash of every id's token text} —
    equal for the same tokenizer wherever it is loaded from, different when any id maps to another token."""
    import hashlib

    n = len(tok)
    tokens = tok.convert_ids_to_tokens(list(range(n)))
    digest = hashlib.sha256("\n".join("" if t is None else str(t) for t in tokens).encode("utf-8", "replace"))
    return {"vocab_size": n, "tokenizer_fingerprint": digest.hexdigest()[:16]}
