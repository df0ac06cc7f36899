"""Quantised Hugging Face checkpoints from a plain (merged) model folder: `tunesmith export --quant_method
bnb|fp8|gptq|gptq_v2 --quant_bits N`, named as ms-swift's `swift export` names them (its default output folder
`<model>-<method>-int<bits>`, --group_size 128, --quant_batch_size 1, float16 for the calibrated methods).

- bnb (4 or 8 bits): transformers' BitsAndBytesConfig (4-bit NF4 with double quantisation, or LLM.int8), written
  by save_pretrained; the folder loads with a plain AutoModelForCausalLM.from_pretrained (bitsandbytes installed).
- fp8 (8 bits): FP8 E4M3 weights, one scale per output channel, activations quantised per token at run time
  (compressed-tensors' FP8_DYNAMIC scheme, the format llm-compressor writes and vLLM serves); data-free, and it
  runs on a CPU. transformers' own FineGrainedFP8Config refuses to quantise without a GPU ("No GPU or XPU found. A
  GPU or XPU is needed for FP8 quantization.", transformers/quantizers/quantizer_finegrained_fp8.py), which is why
  the checkpoint is written with compressed-tensors; transformers loads it back with compressed-tensors installed.
- gptq / gptq_v2 (2, 3, 4 or 8 bits): GPTQ through gptqmodel (GPTQModel.load(...).quantize(calibration).save()),
  calibrated on texts from --dataset; gptq_v2 is the same quantisation stored in gptqmodel's v2 checkpoint format
  (zero points stored as they are: `checkpoint_format: gptq_v2`, what ms-swift's gptq_v2 writes through optimum).
  It runs on a CPU; transformers loads the result with optimum and gptqmodel installed.
- awq is refused: AutoAWQ, the library ms-swift quantises AWQ with, is deprecated by its author (last release 0.2.9,
  2025-05) and needs CUDA.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable

from tunesmith.errors import ConfigError
from tunesmith.export.merge import atomic_output
from tunesmith.files import unwritable

QUANT_METHODS: tuple[str, ...] = ("bnb", "fp8", "gptq", "gptq_v2", "awq")
QUANT_BITS = {"bnb": (4, 8), "fp8": (8,), "gptq": (2, 3, 4, 8), "gptq_v2": (2, 3, 4, 8)}
CALIBRATED = ("gptq", "gptq_v2")
MIN_CALIBRATION_TOKENS = 10  # gptqmodel's quantize(calibration_data_min_length=10)
# the Python module each method needs, and the tunesmith extra that installs it
LIBRARY = {"bnb": ("bitsandbytes", "qlora"), "fp8": ("compressed_tensors", "fp8"),
           "gptq": ("gptqmodel", "gptq"), "gptq_v2": ("gptqmodel", "gptq")}
AWQ_REFUSED = ("--quant_method awq is not supported: AutoAWQ, the library that writes AWQ checkpoints, is deprecated "
               "by its author and no longer maintained (last release 0.2.9, May 2025) and runs on CUDA only. Use "
               "--quant_method gptq --quant_bits 4 --dataset ... instead (also 4-bit, calibrated, served by vLLM "
               "and SGLang), or for a laptop --to_gguf true --gguf_quant q4_k_m (llama.cpp, Ollama, LM Studio)")


def default_bits(method: str) -> int | None:
    """The --quant_bits a method takes when none is given: 8 for fp8 (its only width), else None (required)."""
    return 8 if method == "fp8" else None


def default_torch_dtype(method: str) -> str | None:
    """The --torch_dtype a method loads the model in when none is given, as ms-swift's export: float16 for the
    calibrated methods (gptq, gptq_v2), else None (the checkpoint's own dtype)."""
    return "float16" if method in CALIBRATED else None


def default_output_dir(model_dir: str, method: str, bits: int) -> str:
    """ms-swift's name for a quantised export of model_dir: `<model_dir>-<method>-int<bits>` (e.g.
    `ckpt-merged-gptq-int4`); fp8, which has no integer width, is `<model_dir>-fp8`."""
    base = os.path.abspath(model_dir).rstrip(os.sep)
    return f"{base}-fp8" if method == "fp8" else f"{base}-{method}-int{bits}"


def quant_problems(method: str, bits: int | None, *, group_size: int, has_dataset: bool) -> list[str]:
    """What is wrong with a quantised export's flags, found before the model loads, one message each (empty when
    nothing is): a method not in QUANT_METHODS, awq (refused with the reason and what to use instead), --quant_bits
    missing or outside QUANT_BITS[method], --group_size not -1 or positive (gptq), gptq without --dataset (its
    calibration texts), and the library the method needs missing (named with its extra: bitsandbytes via
    tunesmith[qlora], compressed-tensors via tunesmith[fp8], gptqmodel and optimum via tunesmith[gptq])."""
    if method not in QUANT_METHODS:
        return [f"--quant_method {method}: expected one of {', '.join(QUANT_METHODS)}"]
    if method == "awq":
        return [AWQ_REFUSED]
    out = []
    allowed = QUANT_BITS[method]
    if bits is None and default_bits(method) is None:
        out.append(f"--quant_method {method} needs --quant_bits ({' or '.join(map(str, allowed))})")
    elif bits is not None and bits not in allowed:
        out.append(f"--quant_bits {bits}: --quant_method {method} writes {' or '.join(map(str, allowed))}-bit "
                   f"weights")
    if method in CALIBRATED:
        if group_size != -1 and (not isinstance(group_size, int) or group_size < 1):
            out.append(f"--group_size {group_size}: expected a positive number of input columns per scale "
                       f"(128 by default) or -1 for one scale per output row")
        if not has_dataset:
            out.append(f"--quant_method {method} calibrates on your data: pass --dataset (rows of the kind the "
                       f"model will see; --quant_n_samples of them are used, 256 by default)")
    module, extra = LIBRARY[method]
    if importlib.util.find_spec(module) is None:
        out.append(f"--quant_method {method} needs {module.replace('_', '-')}: pip install 'tunesmith[{extra}]'")
    return out


def write_quantised(model_dir: str, tokenizer, out_dir: str, method: str, bits: int, *, group_size: int = 128,
                    calibration: list[str] | None = None, batch_size: int = 1, torch_dtype=None,
                    extra_files: Callable[[str], None] | None = None) -> None:
    """Quantise the plain Hugging Face model in model_dir with method at bits and write out_dir: the quantised
    weights (safetensors), config.json with its quantization_config, generation_config.json, tokenizer (with its
    chat template), and whatever extra_files(tmp_dir) adds (e.g. args.json). out_dir appears only when complete
    (tunesmith.files.atomic_dir); an existing out_dir is replaced.

    calibration: the texts gptq calibrates on (the rendered --dataset rows, --quant_n_samples of them), tokenised
    with tokenizer; batch_size: calibration rows per forward pass. torch_dtype: the dtype the model is loaded in
    (a torch.dtype or its name; None: default_torch_dtype(method), else the checkpoint's own). group_size: input
    columns per GPTQ scale (-1: one per row). bnb and fp8 ignore calibration and group_size.

    Raises ConfigError for anything quant_problems finds and for an out_dir that cannot be written (both before
    the model loads), TunesmithError for a write the disk refused (a full disk, a read-only file system: nothing
    is left half-written)."""
    problems = quant_problems(method, bits, group_size=group_size, has_dataset=bool(calibration))
    why = unwritable(out_dir, folder=True)
    if why:
        problems.append(f"{out_dir}: {why}")
    if problems:
        raise ConfigError("; ".join(problems))
    if method in CALIBRATED:
        calibration = calibration_texts(calibration, tokenizer)
    bits = bits or default_bits(method)
    dtype = _dtype(torch_dtype or default_torch_dtype(method))
    out_dir = os.path.abspath(out_dir)
    with atomic_output(out_dir, "the quantised model") as tmp:
        if method == "bnb":
            _write_bnb(model_dir, tmp, bits, dtype)
        elif method == "fp8":
            _write_fp8(model_dir, tmp, dtype)
        else:
            _write_gptq(model_dir, tmp, bits, group_size, calibration, batch_size, dtype, tokenizer,
                        v2=method == "gptq_v2")
        tokenizer.save_pretrained(tmp)
        if extra_files is not None:
            extra_files(tmp)


def calibration_texts(texts: list[str], tokenizer) -> list[str]:
    """The texts GPTQ can calibrate on: those of at least MIN_CALIBRATION_TOKENS tokens (gptqmodel's
    calibration_data_min_length; it drops shorter ones, and fails with a ZeroDivisionError when none is left).
    Raises ConfigError when none is long enough."""
    kept = [t for t in texts if len(tokenizer(t)["input_ids"]) >= MIN_CALIBRATION_TOKENS]
    if not kept:
        raise ConfigError(f"--dataset: none of the {len(texts)} calibration rows is {MIN_CALIBRATION_TOKENS} tokens "
                          f"or longer (GPTQ drops shorter ones); give rows with more text, or more rows "
                          f"(--quant_n_samples)")
    return kept


def _dtype(name):
    """torch_dtype as a torch.dtype ("auto" for None: the checkpoint's own)."""
    import torch

    if name is None or name == "auto":
        return "auto"
    if isinstance(name, torch.dtype):
        return name
    name = str(name).removeprefix("torch.")
    return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
            "float32": torch.float32, "fp32": torch.float32}[name]


def _write_bnb(model_dir: str, tmp: str, bits: int, dtype) -> None:
    """bitsandbytes: the model loaded through BitsAndBytesConfig (4-bit NF4 + double quantisation, computing in
    the model's dtype; or LLM.int8) and saved with save_pretrained, which serialises the packed weights and
    their quantisation state (transformers' bnb integration)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 8:
        qc = BitsAndBytesConfig(load_in_8bit=True)
    else:
        compute = dtype if isinstance(dtype, torch.dtype) else _dtype(AutoConfig.from_pretrained(model_dir).dtype)
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute if isinstance(compute, torch.dtype) else None)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=qc, dtype=dtype)
    model.save_pretrained(tmp)


def _write_fp8(model_dir: str, tmp: str, dtype) -> None:
    """FP8 (E4M3) weights with one scale per output channel, absmax / 448 (compressed-tensors' calculate_qparams
    for its FP8_DYNAMIC scheme, the data-free scheme llm-compressor applies), activations quantised per token at
    run time; lm_head stays in the model's dtype (as llm-compressor's FP8_DYNAMIC examples leave it). Written as
    compressed-tensors' "float-quantized" format, config.json's quantization_config from its ModelCompressor."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    scheme = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    with torch.no_grad():
        for module in model.modules():
            args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
            if args is None:
                continue
            w = module.weight.float()
            scale, _ = calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), args)
            module.weight_scale.copy_(scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="float-quantized")
    compressor.compress_model(model)
    model.save_pretrained(tmp)
    compressor.update_config(tmp)


def _write_gptq(model_dir: str, tmp: str, bits: int, group_size: int, calibration: list[str], batch_size: int,
                dtype, tokenizer, v2: bool) -> None:
    """GPTQ (Frantar et al. 2022, arXiv:2210.17323) through gptqmodel's documented API: GPTQModel.load(model_dir,
    QuantizeConfig(bits, group_size, format)).quantize(calibration, batch_size, tokenizer).save(tmp). gptqmodel
    rewrites generation_config.json (it turns do_sample on); the source model's is put back, so the quantised
    model generates with the same defaults."""
    _gptqmodel_workers()
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization import FORMAT

    model_dir, tmp = os.path.abspath(model_dir), os.path.abspath(tmp)
    qc = QuantizeConfig(bits=bits, group_size=group_size, format=FORMAT.GPTQ_V2 if v2 else FORMAT.GPTQ)
    # gptqmodel writes a per-layer log under ./logs of the working directory (gptqmodel/looper/loop_processor.py
    # _PROJECT_LOG_DIR); it runs in a scratch folder, removed after, so the user's folder gets no logs/
    with tempfile.TemporaryDirectory(prefix="tunesmith-gptq-") as scratch, _working_dir(scratch):
        model = GPTQModel.load(model_dir, qc, **({} if dtype == "auto" else {"dtype": dtype}))
        model.quantize(list(calibration), batch_size=batch_size, tokenizer=tokenizer)
        model.save(tmp)
    source = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(source):
        shutil.copyfile(source, os.path.join(tmp, "generation_config.json"))


@contextlib.contextmanager
def _working_dir(path: str):
    """The process's working directory is path inside the block, and what it was after."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _gptqmodel_workers() -> None:
    """gptqmodel 7.6/7.7 cannot start on a machine with 1 or 2 CPUs: its model-loader pool asks for 2 CPU workers
    and its CPU pool gets (cpus + 1) // 2 = 1 ("Virtual pool 'model_loader:cpu' requests 2 workers but parent
    'cpu' only has 1", gptqmodel/__init__.py _build_device_thread_pool). Its own override,
    GPTQMODEL_CPU_WORKERS, is set to 2 there (only where the user has not set it)."""
    if (os.cpu_count() or 1) <= 2:
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
