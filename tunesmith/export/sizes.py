"""How big an export will be, checked before anything is written: GGUF sizes per type (llama.cpp's block sizes from
the `gguf` package), the free space they need, and --max_shard_size as transformers reads it.

A disk filled by an export's copies is among the most reported GGUF failures of the peers (unsloth #6082): export
refuses up front, naming the space it needs, instead of failing half-way.
"""
from __future__ import annotations

import math
import re
import shutil

from tunesmith.errors import ConfigError
from tunesmith.files import existing_ancestor

SHARD_SIZE = re.compile(r"^(\d+)(GiB|MiB|KiB|GB|MB|KB)$", re.I)  # what transformers' convert_file_size_to_int reads
FLOAT_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0}


def shard_size_problem(value: str) -> list[str]:
    """[] or one problem for --max_shard_size: a whole number of at least 1 and a unit, as transformers reads it."""
    size = SHARD_SIZE.match(str(value).strip())
    if not size or int(size.group(1)) < 1:
        return [f"--max_shard_size {value}: expected a whole number of at least 1 and a unit, e.g. 5GB, 500MB or "
                f"2GiB"]
    return []


def bytes_per_weight(gguf_type: str) -> float:
    """Bytes per weight of a GGUF type (f16: 2.0, q8_0: 34/32, q4_k_m: Q4_K's 144/256 — its mix puts some tensors
    in Q6_K, so the estimate uses the next type up for the _m/_l mixes). Source: gguf.GGML_QUANT_SIZES."""
    import gguf

    name = gguf_type.lower()
    if name in FLOAT_BYTES:
        return FLOAT_BYTES[name]
    base = re.sub(r"_(xs|s|m|l|xxs|nl)$", "", name).upper()
    if name.endswith(("_m", "_l")) and base[:-2].startswith("Q") and base.endswith("_K"):
        base = f"Q{min(int(base[1]) + 1, 6)}_K"
    qtype = getattr(gguf.GGMLQuantizationType, base, None)
    if qtype is None:
        return 2.0  # an unknown mix: sized like f16, never smaller than it will be
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return size / block


def gguf_bytes(source, types: list[str]) -> int:
    """Bytes the GGUF files of `types` take for the weights of source (a TensorSource: .shapes {name: shape},
    .dtypes {name: dtype name, e.g. "bfloat16"}), plus the float intermediate llama.cpp's quantiser reads when a
    type needs it and no float file is asked for."""
    from tunesmith.export.to_gguf import PYTHON_TYPES  # written by the gguf package; the others by llama.cpp's

    n = sum(math.prod(shape) for shape in source.shapes.values())
    types = [t.lower() for t in types]
    total = sum(n * bytes_per_weight(t) for t in types)
    # llama.cpp's types are quantised from a float file in the model's own float type (the matrices': 1-D norms
    # may be stored wider), unless that very type is asked for too
    names = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
    kinds = {names.get(str(source.dtypes[k]).removeprefix("torch."), "f16") for k, shape in source.shapes.items()
             if len(shape) >= 2}
    base = "f32" if "f32" in kinds else "bf16" if "bf16" in kinds else "f16"
    if any(t not in PYTHON_TYPES for t in types) and base not in types:
        total += n * FLOAT_BYTES[base]
    return int(total * 1.02) + (16 << 20)  # metadata and the tokenizer: a few MiB


def check_free_space(out: str, needed: int, what: str) -> None:
    """Raise ConfigError when the file system that will hold out has less than `needed` bytes free (GiB in the
    message: needed, free, where)."""
    where = existing_ancestor(out)
    free = shutil.disk_usage(where).free
    if free < needed:
        raise ConfigError(f"{what} need about {needed / 2**30:.2f} GiB and {where} has {free / 2**30:.2f} GiB "
                          f"free; free some space or choose another --output_dir (nothing was written)")
