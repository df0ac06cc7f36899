"""`tunesmith export`: a trained model out of tunesmith, in one of four forms (one per command):

    flags                               default --output_dir            what is written
    --merge_lora true                   <checkpoint>-merged             a Hugging Face folder, adapters merged
    --to_gguf true [--to_ollama true]   <checkpoint>-gguf               GGUF files (one per --gguf_quant) [+ Modelfile]
    --to_ollama true                    <checkpoint>-ollama             a Modelfile (+ the merged weights for adapters)
    --quant_method M [--quant_bits N]   <checkpoint>-M-int<N>           a quantised Hugging Face checkpoint

--adapters are merged into the unquantised base on the way (a QLoRA adapter too); for GGUF and quantised exports
the merge stays in memory (no extra copy on disk). Every output appears only when complete (written under a
temporary name and renamed); the libraries that write them are tunesmith.export's.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys

from tunesmith.config.checks import raise_problems
from tunesmith.config.groups import ExportOutputArgs
from tunesmith.config.slices import ModelConfig, take
from tunesmith.errors import ConfigError
from tunesmith.export.merge import (atomic_output, remove_stale_temporaries, terminate_as_interrupt,
                                    write_model_folder)
from tunesmith.files import write_text_atomic
from tunesmith.models.checkpoint import adapter_problem, resolve_checkpoint, split_named_adapters
from tunesmith.models.load import load_for_inference, note
from tunesmith.runs.run_dir import save_args


def flag_problems(args, cfg: ExportOutputArgs) -> list[str]:
    """export's flag values, before anything loads: --max_shard_size (a whole number of at least 1 and a unit, as
    transformers reads it), --output_dir (a folder that can be written), the GGUF types, the quantisation method and
    bits, and the combinations that would need two outputs. cfg: export's own flags as given (before a checkpoint
    fills anything in)."""
    from tunesmith.config.parser import deferred_problems, given_flags
    from tunesmith.export.quantise import quant_problems
    from tunesmith.export.sizes import shard_size_problem
    from tunesmith.export.to_gguf import gguf_quant_problems
    from tunesmith.files import unwritable

    out = shard_size_problem(cfg.max_shard_size)
    if cfg.output_dir is not None:
        why = unwritable(cfg.output_dir, folder=True)
        if why:
            out.append(f"--output_dir {cfg.output_dir}: {why}")
    given = given_flags(args)
    if cfg.to_gguf:
        out += gguf_quant_problems(list(cfg.gguf_quant))
        out += [f"--{f} shapes a Hugging Face folder's weight files; GGUF files are one file per type: drop it"
                for f in ("max_shard_size", "safe_serialization") if f in given]
    elif "gguf_quant" in given:
        out.append("--gguf_quant chooses the GGUF types: pass --to_gguf true with it")
    if cfg.quant_method:
        out += quant_problems(cfg.quant_method, cfg.quant_bits, group_size=cfg.group_size,
                              has_dataset=bool(args.dataset))
        if cfg.to_gguf:
            out.append(f"--quant_method {cfg.quant_method} writes a quantised Hugging Face checkpoint; GGUF files "
                       f"are quantised with --gguf_quant (e.g. --to_gguf true --gguf_quant q4_k_m): one export per "
                       f"command, so run them as two")
        elif cfg.to_ollama:
            out.append(f"--quant_method {cfg.quant_method} and --to_ollama are two exports: Ollama runs GGUF files "
                       f"(--to_gguf true --gguf_quant q4_k_m --to_ollama true) or the merged weights; run them as two")
    elif cfg.quant_bits is not None:
        out.append("--quant_bits goes with --quant_method (bnb, fp8, gptq); GGUF types are chosen with --gguf_quant")
    for name, value in (("quant_n_samples", cfg.quant_n_samples), ("quant_batch_size", cfg.quant_batch_size)):
        if value < 1:
            out.append(f"--{name} {value}: expected a whole number of at least 1")
    if cfg.group_size == 0 or cfg.group_size < -1:
        out.append(f"--group_size {cfg.group_size}: expected -1 (one group per row) or a whole number of at least 1")
    # a target whose value did not parse is reported by the parser already (deferred_problems)
    unparsed = " ".join(deferred_problems(args))
    targets = ("to_gguf", "quant_method", "to_ollama", "merge_lora")
    if not (cfg.to_gguf or cfg.quant_method or cfg.to_ollama or cfg.merge_lora) and not any(
            f"--{t}" in unparsed for t in targets):
        out.append(NOTHING_TO_EXPORT)
    return out


NOTHING_TO_EXPORT = ("tunesmith export needs something to write: --merge_lora true (a merged Hugging Face folder), "
                     "--to_gguf true (GGUF files for llama.cpp/Ollama/LM Studio), --to_ollama true (an Ollama "
                     "Modelfile) or --quant_method bnb|fp8|gptq (a quantised checkpoint)")


def export_kind(cfg: ExportOutputArgs) -> str:
    """Which output the flags ask for: "gguf", "quant", "ollama" or "merged". Raises ConfigError when none is
    (flag_problems says so first)."""
    if cfg.to_gguf:
        return "gguf"
    if cfg.quant_method:
        return "quant"
    if cfg.to_ollama:
        return "ollama"
    if cfg.merge_lora:
        return "merged"
    raise ConfigError(NOTHING_TO_EXPORT)


def main(args):
    """`tunesmith export`: merge, or write GGUF files, an Ollama Modelfile or a quantised checkpoint. Returns 0.
    Raises FlagError (flag values, before anything loads) or ConfigError (nothing to export, a reward model, a
    family or tokenizer the output cannot hold, the output exists)."""
    from tunesmith.inference.flags import check_inference_flags
    from tunesmith.models.load import resolve_model_dir

    cfg = take(ExportOutputArgs, args)  # before the checkpoint fills in: a QLoRA checkpoint's quant_method is
    check_inference_flags(args, flag_problems(args, cfg))  # how it trained, not what to write
    kind = export_kind(cfg)
    args, _ = resolve_checkpoint(args)
    adapters, named = split_named_adapters(list(args.adapters))
    if named:
        raise ConfigError("--adapters name=path pairs are for deploy; export merges plain adapter paths")
    if kind == "merged" and not adapters:
        raise ConfigError("--merge_lora true needs --adapters CKPT (the LoRA checkpoint to merge)")
    raise_problems([m for m in (adapter_problem(a, merge=True) for a in adapters) if m])  # every export merges
    out = os.path.abspath(cfg.output_dir or default_output_dir(kind, cfg, adapters, args.model))
    if args.quant_method and adapters and args.quant_method != cfg.quant_method:
        note(f"the adapter was trained on a {args.quant_method} {args.quant_bits}-bit base; it is merged into the "
             f"unquantised weights")
    model_dir = resolve_model_dir(args.model, args.use_hf, args.model_revision, args.hub_token)
    problem = output_problem(out, kind, [model_dir] + adapters, cfg.exist_ok)
    if problem:
        raise ConfigError(problem)
    remove_stale_temporaries(out)
    with terminate_as_interrupt():
        {"merged": _merged, "gguf": _gguf, "ollama": _ollama, "quant": _quantised}[kind](args, cfg, adapters, out,
                                                                                        model_dir)
    return 0


def output_problem(out: str, kind: str, sources: list[str], exist_ok: bool) -> str | None:
    """Why the export must not be written to out, or None: out is (or holds) a folder the export reads — replacing
    it would delete the model being exported —, out exists without --exist_ok, or (with it) holds files an earlier
    export of this kind did not write: --exist_ok replaces the folder as a whole, so only an earlier export is
    replaced, never a folder of other files."""
    for src in sources:
        src = os.path.abspath(src)
        if src == out or src.startswith(out.rstrip(os.sep) + os.sep):
            return (f"--output_dir {out} is (or holds) {src}, which this export reads; writing there would replace "
                    f"it: choose another --output_dir")
    if not os.path.exists(out):
        return None
    if not exist_ok:
        return f"{out} already exists; pass --exist_ok true to replace it or choose --output_dir"
    strangers = _not_an_export(out, kind)
    if strangers:
        return (f"--output_dir {out} holds files an export did not write ({', '.join(strangers[:3])}"
                f"{', …' if len(strangers) > 3 else ''}): --exist_ok true replaces the folder as a whole, so it "
                f"replaces only an earlier export; choose a new or empty folder")
    return None


def _not_an_export(out: str, kind: str) -> list[str]:
    """The entries of the existing folder out that an earlier export of `kind` does not write: for GGUF anything
    but *.gguf files and a Modelfile; for the Hugging Face forms everything, unless its args.json says tunesmith
    export wrote it (merged_from) or it holds only a Modelfile."""
    entries = sorted(os.listdir(out))
    if kind == "gguf":
        return [e for e in entries if not (e.endswith(".gguf") or e == "Modelfile")]
    if set(entries) <= {"Modelfile"} or "merged_from" in _read_json(os.path.join(out, "args.json")):
        return []
    return entries


def default_output_dir(kind: str, cfg: ExportOutputArgs, adapters: list[str], model: str) -> str:
    """ms-swift's default: <checkpoint>-<suffix> next to the first adapter (or the model folder; a hub id: in the
    working directory), suffix merged, gguf, ollama, <method>-int<bits> or fp8."""
    from tunesmith.export import quantise

    source = adapters[0] if adapters else model
    if not os.path.isdir(source):
        source = source.rstrip("/").split("/")[-1]  # a hub id: its name, here
    if kind == "quant":
        return quantise.default_output_dir(source, cfg.quant_method,
                                           cfg.quant_bits or quantise.default_bits(cfg.quant_method))
    return os.path.abspath(source).rstrip(os.sep) + "-" + kind


def _load(args, adapters: list[str], model_dir: str):
    """(model with the adapters merged, tokenizer): the unquantised base, as every export takes it."""
    return load_for_inference(take(ModelConfig, args), adapters, merge=True, quantise=False, model_dir=model_dir)[:2]


def _merged_args(args, out: str, adapters: list[str], model_dir: str):
    """extra_files for write_model_folder: the args.json that keeps the run's prompt settings (resolve_checkpoint:
    template, system, enable_thinking, ...) with the merged model; local paths absolute, as training records them."""
    return lambda tmp: save_args(tmp, args, {
        "model": out, "adapters": [], "train_type": "full", "quant_method": None, "quant_bits": None,
        "merged_from": {"model": args.model, "model_dir": model_dir, "adapters": [os.path.abspath(a) for a in adapters]}})


def _merged(args, cfg: ExportOutputArgs, adapters: list[str], out: str, model_dir: str) -> None:
    model, tok = _load(args, adapters, model_dir)
    write_model_folder(model, tok, out, safe_serialization=cfg.safe_serialization, max_shard_size=cfg.max_shard_size,
                       extra_files=_merged_args(args, out, adapters, model_dir), processor_dir=model_dir)
    print(f"[tunesmith] export: merged {', '.join(adapters)} into {args.model} -> {out}", file=sys.stderr)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _gguf(args, cfg: ExportOutputArgs, adapters: list[str], out: str, model_dir: str) -> None:
    """GGUF files, one per --gguf_quant, from one pass over the weights (the merged model in memory for adapters,
    else streamed from the model folder's safetensors), and the Modelfile with --to_ollama."""
    from tunesmith.export.sizes import check_free_space, gguf_bytes
    from tunesmith.export.to_gguf import (gguf_family_problem, source_from_folder, source_from_model,
                                          tokenizer_problem, write_gguf)
    from tunesmith.models.load import load_tokenizer

    config = _read_json(os.path.join(model_dir, "config.json"))
    tok = load_tokenizer(take(ModelConfig, args), model_dir)
    problem = (gguf_family_problem(config) or tokenizer_problem(tok, config)
               or (_ollama_problem(config, tok) if cfg.to_ollama else None))
    experts = config.get("num_local_experts") or config.get("num_experts")
    if not problem and "mxfp4_moe" in [t.lower() for t in cfg.gguf_quant] and not experts:
        problem = (f"--gguf_quant mxfp4_moe quantises the experts of a mixture-of-experts model (gpt-oss); this "
                   f"{config.get('model_type')} model has none: use q4_k_m, q5_k_m or q8_0")
    if problem:
        raise ConfigError(problem)
    if not getattr(tok, "chat_template", None):
        note("the tokenizer has no chat template: the GGUF embeds none, so llama.cpp, LM Studio and Ollama fall "
             "back to their own guess of the chat format")
    if adapters:
        model, tok = _load(args, adapters, model_dir)
        source = source_from_model(model)
    else:
        source = source_from_folder(model_dir)
    check_free_space(out, gguf_bytes(source, list(cfg.gguf_quant)), "the GGUF files")
    stem = export_stem(args.model, adapters)
    with atomic_output(out, "the GGUF files") as tmp:
        paths = write_gguf(source, config, tok, tmp, stem, list(cfg.gguf_quant),
                           generation_config=_read_json(os.path.join(model_dir, "generation_config.json")),
                           name=stem)
        names = [os.path.basename(p) for p in paths]
        if cfg.to_ollama:
            _write_modelfile(args, tmp, "./" + names[0], config, tok, model_dir)
    for name in names:
        print(f"[tunesmith] export: {os.path.join(out, name)}", file=sys.stderr)
    print(f"[tunesmith] run it: llama-cli -m {shlex.quote(os.path.join(out, names[0]))} -cnv", file=sys.stderr)
    if cfg.to_ollama:
        _print_ollama_hint(out, stem)


def _ollama(args, cfg: ExportOutputArgs, adapters: list[str], out: str, model_dir: str) -> None:
    """A Modelfile: with adapters, next to the merged weights written in out (FROM .); for a plain --model, alone
    in out, FROM the model folder (ms-swift's layout: Ollama imports the safetensors)."""
    from tunesmith.models.load import load_tokenizer

    config = _read_json(os.path.join(model_dir, "config.json"))
    tok = load_tokenizer(take(ModelConfig, args), model_dir)
    problem = _ollama_problem(config, tok)
    if problem:
        raise ConfigError(problem)
    stem = export_stem(args.model, adapters)
    if adapters:
        model, tok = _load(args, adapters, model_dir)
        merged_args = _merged_args(args, out, adapters, model_dir)

        def extra(tmp):
            merged_args(tmp)
            _write_modelfile(args, tmp, ".", config, tok, model_dir)
        write_model_folder(model, tok, out, safe_serialization=True, max_shard_size=cfg.max_shard_size,
                           extra_files=extra, processor_dir=model_dir)
    else:
        with atomic_output(out, "the Modelfile") as tmp:
            _write_modelfile(args, tmp, model_dir, config, tok, model_dir)
    _print_ollama_hint(out, stem)


def _ollama_problem(config: dict, tok) -> str | None:
    from tunesmith.export.ollama import ollama_problem

    return ollama_problem(config.get("model_type", ""), getattr(tok, "chat_template", None), tok)


def _write_modelfile(args, folder: str, source: str, config: dict, tok, model_dir: str) -> None:
    """folder/Modelfile: FROM source, the chat format's TEMPLATE, stop tokens, --system and the sampling defaults
    (the model's generation_config.json, overridden by the sampling flags given to export)."""
    from tunesmith.config.parser import given_flags
    from tunesmith.export.ollama import modelfile

    generation = {k: v for k, v in _read_json(os.path.join(model_dir, "generation_config.json")).items()
                  if k in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty") and v is not None}
    given = given_flags(args)
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                "repetition_penalty": args.repetition_penalty, "max_new_tokens": args.max_new_tokens}
    generation.update({k: v for k, v in sampling.items() if k in given and v is not None})
    if "temperature" in given:
        generation.pop("do_sample", None)  # a --temperature given to export wins over a greedy generation config
    text = modelfile(source=source, model_type=config.get("model_type", ""), chat_template=tok.chat_template,
                     tokenizer=tok, system=args.system, generation=generation, stops=list(args.stop_words) or None,
                     enable_thinking=args.enable_thinking)
    write_text_atomic(os.path.join(folder, "Modelfile"), text)


def _print_ollama_hint(out: str, stem: str) -> None:
    from tunesmith.export.ollama import ollama_create_hint

    print(f"[tunesmith] export: {os.path.join(out, 'Modelfile')}\n"
          + ollama_create_hint(os.path.join(out, "Modelfile"), ollama_model_name(stem)), file=sys.stderr)


def ollama_model_name(stem: str) -> str:
    """A name `ollama create` accepts for stem: ASCII letters, digits, '_', '-' and '.', at most 80 characters
    (Ollama's types/model/name.go isValidPart), accents folded (mödel -> model), other characters as '-'."""
    import unicodedata

    ascii_only = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode().lower()
    name = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9_.-]", "-", ascii_only)).strip("-.")
    return name[:80].rstrip("-.") or "model"


def export_stem(model: str, adapters: list[str]) -> str:
    """The file name stem of exported files: the base model's name, and the checkpoint's for adapters
    (Qwen2.5-0.5B-Instruct-checkpoint-50), as Ollama and LM Studio show it; for a full or merged checkpoint given
    as --model, the model its args.json names, then the folder (Qwen2.5-0.5B-Instruct-checkpoint-50-merged)."""
    if adapters:  # the base's own stem: a full checkpoint as base is named with its model too
        return f"{export_stem(model, [])}-{os.path.basename(os.path.normpath(adapters[0]))}"
    base = os.path.basename(os.path.normpath(model)) or "model"
    saved = _read_json(os.path.join(model, "args.json")) if os.path.isdir(model) else {}
    origin = (saved.get("merged_from") or {}).get("model") or saved.get("model")
    origin = os.path.basename(os.path.normpath(origin)) if isinstance(origin, str) and origin else None
    return f"{origin}-{base}" if origin and origin != base else base  # a full or merged checkpoint: its model too


def _quantised(args, cfg: ExportOutputArgs, adapters: list[str], out: str, model_dir: str) -> None:
    """A quantised Hugging Face checkpoint from the model folder, or from the merge of the adapters (written to a
    temporary folder next to out, removed afterwards); gptq calibrates on the first --quant_n_samples rows of
    --dataset rendered by the chat template."""
    from tunesmith.export.quantise import default_bits, default_torch_dtype, write_quantised
    from tunesmith.models.load import load_tokenizer

    bits = cfg.quant_bits or default_bits(cfg.quant_method)
    tok = load_tokenizer(take(ModelConfig, args), model_dir)
    calibration = _calibration_texts(args, tok, cfg.quant_n_samples) if cfg.quant_method.startswith("gptq") else None
    source = model_dir
    merged_tmp = None
    if adapters:
        merged_tmp = os.path.join(os.path.dirname(out), f".merging-{os.path.basename(out)}-{os.getpid()}")
        model, tok = _load(args, adapters, model_dir)
        write_model_folder(model, tok, merged_tmp, extra_files=None, processor_dir=model_dir)
        del model
        source = merged_tmp
    extra = _merged_args(args, out, adapters, model_dir)
    try:
        write_quantised(source, tok, out, cfg.quant_method, bits, group_size=cfg.group_size,
                        calibration=calibration, batch_size=cfg.quant_batch_size,
                        torch_dtype=args.torch_dtype or default_torch_dtype(cfg.quant_method), extra_files=extra)
    finally:
        if merged_tmp:
            shutil.rmtree(merged_tmp, ignore_errors=True)
    print(f"[tunesmith] export: {cfg.quant_method} {bits}-bit checkpoint -> {out}", file=sys.stderr)


def _calibration_texts(args, tok, n: int) -> list[str]:
    """The first n rows of --dataset rendered by the chat template (with --system): GPTQ's calibration text."""
    from tunesmith.data.encode import ChatEncoder
    from tunesmith.data.load import load_datasets

    loaded = load_datasets(list(args.dataset), need_reply=False)
    enc = ChatEncoder(tok, system=args.system)
    return [enc.render(enc.with_system(rec["messages"]), tools=rec.get("tools")) for rec in loaded.records[:n]]
