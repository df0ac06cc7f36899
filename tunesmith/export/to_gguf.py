"""GGUF files (llama.cpp, Ollama, LM Studio, Jan) from a Hugging Face model: `write_gguf` writes one file per
requested type from one pass over the weights.

- f32, f16, bf16 and q8_0 are written here with the `gguf` package (llama.cpp's own Python writer and quantisers:
  GGUFWriter, gguf.quants), the way llama.cpp's convert_hf_to_gguf.py writes them.
- every other type (K-quants, legacy and i-quants that need no importance matrix) is made by llama.cpp's own
  quantiser, `llama_model_quantize` (bound by llama-cpp-python: pip install 'tunesmith[gguf]'), from a float GGUF
  in the model's own float type (lossless: f32, bf16 or f16), written in the same pass; that intermediate is a
  temporary file in the output folder unless its type was asked for too.

Streaming: each file's header, metadata and tensor table are written first (GGUFWriter.add_tensor_info with the
final shapes and types), then each tensor is read from the source, converted and appended (write_tensor_data), one
at a time: peak memory is the source (an in-memory model, or nothing beyond one tensor for a safetensors folder)
plus about one tensor.

Files appear whole or not at all: each is written as NAME.tmp-PID and renamed only once every requested file is
complete; a failure removes the temporaries. The tensor layouts are tunesmith.export.gguf_tensors', the tokenizer
metadata tunesmith.export.gguf_vocab's.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.export.gguf_tensors import ARCHES, add_model_kv, family_config_problem, plan_tensors, produce
from tunesmith.export.gguf_vocab import add_vocab_kv, build_vocab, vocab_problem

PYTHON_TYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp file types its quantiser makes without an importance matrix: tools/quantize/quantize.cpp's list less
# IQ1_*, IQ2_*, IQ3_XXS, IQ3_XS (IQ3_XXS for some tensors) and Q2_K_S, which src/llama-quant.cpp refuses without
# one, and the ternary TQ1_0/TQ2_0 and Q1_0/Q2_0 types meant for models trained for them (each checked on every
# family: tests/export/test_gguf_llamacpp.py)
LLAMA_CPP_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
                   "q5_k_s", "q5_k_m", "q6_k", "iq3_s", "iq3_m", "iq4_nl", "iq4_xs", "mxfp4_moe")
GGUF_TYPES: tuple[str, ...] = PYTHON_TYPES + LLAMA_CPP_TYPES
GGUF_FAMILIES: tuple[str, ...] = tuple(ARCHES)
EXTRA = "pip install 'tunesmith[gguf]'"
_FLOAT_DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
# safetensors dtype names -> torch's
_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I8": "int8", "U8": "uint8",
              "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
              "F8_E5M2": "float8_e5m2"}


@dataclass(frozen=True)
class TensorSource:
    """A model's tensors, read one at a time: shapes and dtypes (torch dtype names, e.g. "bfloat16") by Hugging
    Face name, and load(name) -> torch.Tensor."""
    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, str]
    load: Callable[[str], object]

    @property
    def names(self) -> tuple[str, ...]:
        """The tensor names, in the source's order."""
        return tuple(self.shapes)


def source_from_folder(model_dir: str) -> TensorSource:
    """The tensors of a Hugging Face model folder's safetensors (model.safetensors, or the shards its
    model.safetensors.index.json lists), each read on demand through safetensors.safe_open (memory-mapped: the
    model is never in memory whole). Raises ConfigError when the folder has no safetensors weights."""
    from safetensors import safe_open

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
    elif os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ConfigError(f"{model_dir} has no safetensors weights (model.safetensors or an index of shards); "
                          f"save the model with safetensors to convert it to GGUF")
    where, shapes, dtypes = {}, {}, {}
    for name in files:
        with safe_open(os.path.join(model_dir, name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                sl = f.get_slice(key)
                where[key], shapes[key] = name, tuple(sl.get_shape())
                dtypes[key] = _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype().lower())

    def load(key: str):
        with safe_open(os.path.join(model_dir, where[key]), framework="pt") as f:
            return f.get_tensor(key)

    return TensorSource(shapes, dtypes, load)


def source_from_model(model) -> TensorSource:
    """The tensors of an in-memory transformers model (e.g. LoRA-merged), by its state dict's names: references to
    its parameters, nothing copied."""
    sd = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in sd.items()}
    return TensorSource(shapes, dtypes, sd.__getitem__)


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python (the `gguf` extra) can be imported."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def gguf_available() -> bool:
    """Whether the `gguf` package (llama.cpp's Python writer; the `gguf` extra) can be imported."""
    import importlib.util

    return importlib.util.find_spec("gguf") is not None


def gguf_quant_problems(types: list[str]) -> list[str]:
    """One message per problem in the requested GGUF types (case-insensitive): a name that is no type (with the
    nearest valid one), a type repeated, the gguf package missing, a type only llama.cpp's quantiser makes while
    llama-cpp-python is not installed (both naming the extra). Cheap: nothing is loaded."""
    out, seen = [], set()
    if not types:
        out.append(f"--gguf_quant: give at least one type (choose from {' '.join(GGUF_TYPES)})")
    for t in types:
        low = str(t).strip().lower()
        if low not in GGUF_TYPES:
            out.append(f"--gguf_quant {t}: {_not_a_type(low)}")
        elif low in seen:
            out.append(f"--gguf_quant {t}: given twice")
        seen.add(low)
    if types and not gguf_available():
        out.append(f"--gguf_quant: writing GGUF needs the gguf package (llama.cpp's Python writer): {EXTRA}")
    needs = [t for t in dict.fromkeys(str(t).strip().lower() for t in types) if t in LLAMA_CPP_TYPES]
    if needs and not llama_cpp_available():
        out.append(f"--gguf_quant {' '.join(needs)}: made by llama.cpp's quantiser, which needs llama-cpp-python: "
                   f"{EXTRA} (or ask only for {', '.join(PYTHON_TYPES)}, written without it)")
    return out


# llama.cpp's own short names (tools/quantize: Q4_K is Q4_K_M, ...) and the types that need an importance matrix
_SHORT = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}
_NEED_IMATRIX = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "q2_k_s")


def _not_a_type(low: str) -> str:
    """Why `low` is not one of GGUF_TYPES, with what to write instead."""
    if "," in low:
        return f"separate the types with spaces: --gguf_quant {' '.join(p for p in low.split(',') if p)}"
    if low in _SHORT:
        return f"write llama.cpp's {low.upper()} as {_SHORT[low]} (what llama-quantize means by it)"
    if low in _NEED_IMATRIX:
        return (f"{low.upper()} needs an importance matrix (llama-imatrix over calibration text), which tunesmith "
                f"does not compute; the smallest types without one are q2_k, q3_k_s, iq3_s and iq4_xs")
    near = difflib.get_close_matches(low, GGUF_TYPES, n=1, cutoff=0.4)
    hint = f"did you mean {near[0]}? " if near else ""
    return f"not a GGUF type; {hint}choose from {' '.join(GGUF_TYPES)}"


def gguf_family_problem(config: dict) -> str | None:
    """Why a model (its config.json as a dict) cannot be written as GGUF here, as one message, or None: a model_type
    outside GGUF_FAMILIES, not a causal LM, a pre-quantised checkpoint, or a setting llama.cpp would not reproduce
    (gguf_tensors.family_config_problem). Call it before any weight loads."""
    family = config.get("model_type")
    archs = config.get("architectures") or []
    if family not in GGUF_FAMILIES:
        what = f"model_type {family!r}" + (f" ({', '.join(archs)})" if archs else "")
        vision = (" (for a vision-language model run it twice: once for the language model, once with --mmproj for "
                  "the vision tower, which llama.cpp loads as a second file)") if "vision_config" in config else ""
        return (f"GGUF export writes the families {', '.join(GGUF_FAMILIES)}; this model is {what}. Convert it "
                f"with llama.cpp's convert_hf_to_gguf.py instead{vision}")
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        return f"GGUF export writes causal language models; this {family} model is a {', '.join(archs)}"
    if config.get("quantization_config"):
        method = (config["quantization_config"] or {}).get("quant_method", "quantised")
        return (f"the model's weights are {method}-quantised; GGUF export needs float weights (bf16/f16/f32): "
                f"export the merged model first, or start from the unquantised base")
    why = family_config_problem(family, config)
    return f"this {family} model cannot be written as GGUF: {why}" if why else None


def tokenizer_problem(tokenizer, config: dict | None = None) -> str | None:
    """Why llama.cpp would tokenise differently from this Hugging Face tokenizer (its pre-tokenizer, model type or
    normalizer; gguf_vocab.vocab_problem), or — given the model's config.json — why it is not this model's
    tokenizer (fewer than half as many tokens as the embedding has rows: a folder without its tokenizer.json, from
    which transformers builds a near-empty one), as one message, or None. Call it before the weights load."""
    why = vocab_problem(tokenizer)
    if why:
        return f"the tokenizer cannot be written to GGUF: {why}"
    rows = (config or {}).get("vocab_size")
    if isinstance(rows, int) and len(tokenizer) < rows // 2:
        return (f"the tokenizer has {len(tokenizer)} tokens for a model with {rows} embedding rows: the model "
                f"folder's tokenizer.json (or vocab.json and merges.txt) is missing or not this model's, and a GGUF "
                f"of it would not load in llama.cpp; copy the base model's tokenizer files into the folder")
    return None


def gguf_file_name(stem: str, gguf_type: str) -> str:
    """{stem}-{TYPE}.gguf, the type upper-case as llama.cpp names its files (F16, Q4_K_M)."""
    return f"{stem}-{gguf_type.upper()}.gguf"


def _checked(source: TensorSource, config: dict, tokenizer, types: list[str]):
    """(family, plan, lower-case types) after every refusal write_gguf makes before writing."""
    problems = gguf_quant_problems(types)
    if problems:
        raise ConfigError("; ".join(problems))
    for why in (gguf_family_problem(config), tokenizer_problem(tokenizer, config)):
        if why:
            raise ConfigError(why)
    family = config["model_type"]
    plan = plan_tensors(family, config, dict(source.shapes))
    odd = [n for n in {p.source for p in plan if p.source} if source.dtypes[n] not in _FLOAT_DTYPES]
    if odd:
        raise ConfigError(f"tensors {', '.join(sorted(odd)[:3])} are {source.dtypes[odd[0]]}, not float: GGUF export "
                          f"needs float weights (bf16/f16/f32)")
    rows, top = next(p for p in plan if p.name == "token_embd.weight").shape[0], max(tokenizer.get_vocab().values())
    if top >= rows:
        raise ConfigError(f"the tokenizer has ids up to {top} but the model's embedding has {rows} rows; resize "
                          f"the embeddings to the tokenizer first")
    return family, plan, [str(t).strip().lower() for t in types]


def float_type(source: TensorSource, plan) -> str:
    """The model's own float type for the llama.cpp intermediate (lossless): f32 if any weight is float32, else
    bf16 if any is bfloat16, else f16."""
    kinds = {_FLOAT_DTYPES[source.dtypes[p.source]] for p in plan if p.source and not p.keep_f32}
    return "f32" if "f32" in kinds else "bf16" if "bf16" in kinds else "f16"


def write_gguf(source: TensorSource, config: dict, tokenizer, out_dir: str, stem: str, types: list[str], *,
               generation_config: dict | None = None, name: str | None = None) -> list[str]:
    """Write out_dir/{stem}-{TYPE}.gguf for each of types (GGUF_TYPES, any case) and return their paths in the
    order asked. config: the model's config.json dict; tokenizer: its Hugging Face (fast) tokenizer, whose chat
    template is embedded; generation_config: generation_config.json's dict (its eos_token_id list decides which
    tokens end generation in llama.cpp); name: general.name (default stem).

    Raises ConfigError (before anything is written) for a type, family, tokenizer or tensor this cannot write or a
    llama.cpp type without llama-cpp-python; TunesmithError when llama.cpp's quantiser fails; OSError when the disk
    refuses a write. Nothing half-written is left behind in any case."""
    family, plan, wanted = _checked(source, config, tokenizer, types)
    native = [t for t in wanted if t in PYTHON_TYPES]
    by_llama = [t for t in wanted if t in LLAMA_CPP_TYPES]
    llama_cpp = _import_llama_cpp() if by_llama else None
    base = float_type(source, plan) if by_llama else None
    finals = {t: os.path.join(out_dir, gguf_file_name(stem, t)) for t in wanted}
    tmp = {t: f"{finals[t]}.tmp-{os.getpid()}" for t in wanted}
    if base and base not in native:
        tmp[base] = os.path.join(out_dir, f".{gguf_file_name(stem, base)}.intermediate-{os.getpid()}")
    vocab = build_vocab(tokenizer, next(p for p in plan if p.name == "token_embd.weight").shape[0], config,
                        generation_config)
    meta = {"family": family, "config": config, "vocab": vocab, "name": name or stem}
    os.makedirs(out_dir, exist_ok=True)
    try:
        write_float_ggufs(plan, source, {t: tmp[t] for t in native + ([base] if base else [])}, **meta)
        for t in by_llama:
            quantize_gguf(llama_cpp, tmp[base], tmp[t], t)
        for t in wanted:
            os.replace(tmp[t], finals[t])
    finally:
        for path in tmp.values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    return [finals[t] for t in wanted]


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise ConfigError(f"the GGUF types beyond {', '.join(PYTHON_TYPES)} are made by llama.cpp's quantiser, "
                          f"which needs llama-cpp-python ({e}): {EXTRA}") from None
    return llama_cpp


def _stored_type(p, gguf_type: str):
    """The ggml type planned tensor p is stored in, in a file of gguf_type (ModelBase.prepare_tensors: F32 kept
    where the converter keeps it; Q8_0 falls back to F16 for rows not a multiple of its 32-value block)."""
    import gguf

    q = gguf.GGMLQuantizationType
    if p.keep_f32 or gguf_type == "f32":
        return q.F32
    if gguf_type == "q8_0":
        return q.Q8_0 if p.shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0] == 0 else q.F16
    return q.BF16 if gguf_type == "bf16" else q.F16


def _file_type(gguf_type: str):
    import gguf

    return gguf.LlamaFileType.ALL_F32 if gguf_type == "f32" else gguf.LlamaFileType[f"MOSTLY_{gguf_type.upper()}"]


_ROWS = 4096  # rows quantised at a time: the float32 temporaries of gguf.quants stay small


def _encode(t, qtype):
    """Tensor t (torch, any float dtype) as the bytes of ggml type qtype, as a numpy array for write_tensor_data:
    F32/F16/BF16 by torch's round-to-nearest-even cast (what ggml's fp32->fp16/bf16 conversions do), Q8_0 by
    gguf.quants (llama.cpp's quantize_row_q8_0 reimplemented), _ROWS rows at a time."""
    import gguf
    import numpy as np
    import torch

    q = gguf.GGMLQuantizationType
    if qtype in (q.F32, q.F16):
        return t.to(torch.float32 if qtype == q.F32 else torch.float16).numpy()
    if qtype == q.BF16:
        return t.to(torch.bfloat16).view(torch.int16).numpy()
    rows = t.reshape(-1, t.shape[-1])
    out = np.empty(gguf.quant_shape_to_byte_shape(tuple(rows.shape), qtype), dtype=np.uint8)
    for i in range(0, rows.shape[0], _ROWS):
        out[i:i + _ROWS] = gguf.quants.quantize(rows[i:i + _ROWS].to(torch.float32).numpy(), qtype)
    return out


def _open_writer(path: str, plan, gguf_type: str, family: str, config: dict, vocab, name: str):
    """A GGUFWriter on path with header, metadata and tensor table written; the tensor data is to follow."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(path, ARCHES[family])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    add_model_kv(w, family, config, len(vocab.tokens))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(_file_type(gguf_type))
    add_vocab_kv(w, vocab)
    for p in plan:
        qtype = _stored_type(p, gguf_type)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), int(np.prod(p.shape)) // block * size,
                          raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    return w


def _last_source_cached(load: Callable[[str], object]) -> Callable[[str], object]:
    """load, remembering the last tensor read: gpt-oss's gate_up_proj makes two GGUF tensors in a row."""
    last: dict = {}

    def cached(name: str):
        if name not in last:
            last.clear()
            last[name] = load(name)
        return last[name]

    return cached


def write_float_ggufs(plan, source: TensorSource, paths: dict[str, str], *, family: str, config: dict, vocab,
                      name: str) -> None:
    """One GGUF per entry of paths (type -> path; types of PYTHON_TYPES) in one pass over the source: every file's
    header and tensor table first, then each tensor read once, converted and appended to every file."""
    writers = {}
    try:
        for t, path in paths.items():
            writers[t] = _open_writer(path, plan, t, family, config, vocab, name)
        load = _last_source_cached(source.load)
        for p in plan:
            data = produce(p, load, config)
            for t, w in writers.items():
                w.write_tensor_data(_encode(data, _stored_type(p, t)))
            del data
    finally:
        for w in writers.values():
            w.close()


def quantize_gguf(llama_cpp, src: str, dst: str, gguf_type: str) -> None:
    """llama.cpp's llama_model_quantize: the float GGUF src as a gguf_type (LLAMA_CPP_TYPES) GGUF dst, run in a
    child process (`python -m tunesmith.export.to_gguf SRC DST TYPE`) so that Ctrl-C or SIGTERM stops it at once:
    in this process a signal arriving inside the C loop reaches Python only in the log callback, whose exception
    ctypes swallows, and the quantisation would run on. Its error, if any, is raised as one TunesmithError (dst
    removed; the child is killed if this process is interrupted). llama_cpp: the imported module (checked present
    by the caller)."""
    import subprocess
    import sys

    del llama_cpp  # imported by the child
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith.export.to_gguf", src, dst, gguf_type],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate()
    except BaseException:
        proc.kill()
        proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.remove(dst)
        raise
    if proc.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            os.remove(dst)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        raise TunesmithError(lines[-1] if lines else f"llama.cpp's quantiser stopped with exit code "
                                                     f"{proc.returncode} while writing {gguf_type.upper()}")


def _quantize_here(llama_cpp, src: str, dst: str, gguf_type: str) -> None:
    """quantize_gguf's work, in the calling process: llama_model_quantize with its log kept quiet (llama_log_set),
    its error raised as one TunesmithError (dst removed)."""
    import ctypes

    import gguf

    errors: list[str] = []

    def log(level, text, _user):  # ggml_log_level: 4 = ERROR, 5 = the previous line continued
        if level == 4 or (level == 5 and errors):
            errors.append(text.decode("utf-8", "replace"))

    callback = llama_cpp.llama_log_callback(log)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(gguf.LlamaFileType[f"MOSTLY_{gguf_type.upper()}"])
        rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    finally:
        _restore_llama_log(llama_cpp)
    if rc != 0:
        with contextlib.suppress(FileNotFoundError):
            os.remove(dst)
        detail = " ".join("".join(errors).split()) or f"return code {rc}"
        raise TunesmithError(f"llama.cpp could not quantise the model to {gguf_type.upper()}: {detail}")


def _restore_llama_log(llama_cpp) -> None:
    """Hand llama.cpp's log back to llama-cpp-python's own callback (which Llama(verbose=...) controls)."""
    import ctypes

    try:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    except (ImportError, AttributeError):  # no such module in this version: llama.cpp's default (stderr)
        llama_cpp.llama_log_set(None, ctypes.c_void_p(0))


if __name__ == "__main__":  # quantize_gguf's child: python -m tunesmith.export.to_gguf SRC DST TYPE
    import sys

    try:
        import llama_cpp as _llama_cpp

        _quantize_here(_llama_cpp, *sys.argv[1:4])
    except TunesmithError as e:
        print(e, file=sys.stderr)
        sys.exit(1)
