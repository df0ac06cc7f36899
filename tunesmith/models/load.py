"""Load a model and tokenizer (local directory or hub id; dtype, attention, quantisation) and attach LoRA. They take
the model slice (tunesmith.config.slices.ModelConfig: `take(ModelConfig, args)` of any command; the tokenizer only
its ModelArgs), never a command's arguments.

Also the small helpers every stage shares about a loaded model: `default_device()` (where work runs when nothing
else decides), `resolve_dtype()` (a --torch_dtype / --lora_dtype name as a torch dtype) and `unwrap_model()` (the
transformers model inside the DDP/DeepSpeed and peft wrappers). `note` (rank-0 messages) lives in tunesmith.log
and is re-exported here for the modules that import it from this one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import warnings
from typing import Optional

from tunesmith.config.groups import ModelArgs
from tunesmith.config.slices import ModelConfig
from tunesmith.errors import ConfigError
from tunesmith.log import note  # noqa: F401 - re-exported: training modules import note from here

# Output heads and MoE routers never get LoRA from `all-linear` (ms-swift's find_all_linears rule).
_EXCLUDED_LEAVES = {"lm_head", "score", "v_head", "classifier", "gate", "router", "shared_expert_gate"}


def resolve_model_dir(model: Optional[str], use_hf: bool = False, revision: Optional[str] = None,
                      token: Optional[str] = None, tokenizer_only: bool = False) -> str:
    """A local directory, or a hub id downloaded from ModelScope (default) or Hugging Face (--use_hf / USE_HF=1).
    A local directory must hold a model (`model_dir_problem`; a tokenizer is enough with tokenizer_only)."""
    if not model:
        raise ConfigError("pass the model with --model (a local directory or a hub id)")
    if os.path.isdir(model):
        problem = model_dir_problem(model, tokenizer_only=tokenizer_only)
        if problem:
            raise ConfigError(problem)
        return os.path.abspath(model)
    if model.startswith((".", "/")) or os.sep in model.strip("/") and model.count("/") > 1:
        raise ConfigError(f"--model {model}: no such directory")
    use_hf = use_hf or os.environ.get("USE_HF", "0").lower() in ("1", "true")
    hub = "Hugging Face"
    try:
        if not use_hf:
            try:
                from modelscope import snapshot_download as ms_download
            except ImportError:
                note("modelscope is not installed; downloading from the Hugging Face hub instead "
                     "(pip install modelscope to use ModelScope)")
            else:
                hub = "ModelScope"
                return ms_download(model, revision=revision)
        from huggingface_hub import snapshot_download

        return snapshot_download(model, revision=revision, token=token)
    except Exception as e:  # noqa: BLE001 - network, auth and not-found errors all end here
        at = f" at revision {revision}" if revision else ""
        raise ConfigError(f"--model {model}: not a local directory, and downloading it{at} from {hub} failed "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Check the path, or "
                          f"the hub id{', the revision' if revision else ''} and your network") from None


def model_dir_problem(model: str, flag: str = "--model", tokenizer_only: bool = False) -> Optional[str]:
    """Why the local folder `model` cannot be loaded as a model (with tokenizer_only: as a tokenizer, what the data
    commands read), or None: it (or a file in it) cannot be read by this user, it is empty, or it holds no
    config.json (no tokenizer files). Checked before anything loads, so that transformers' misleading guesses (a
    tokenizer that needs sentencepiece, a hub download) never come."""
    from tunesmith.files import unreadable

    why = unreadable(model)
    if why:
        return f"{flag} {model}: {why}; fix the permissions (chmod -R a+rX) or run as the files' owner"
    try:
        names = os.listdir(model)
    except OSError as e:
        return f"{flag} {model}: cannot be read ({e.strerror})"
    if not names:
        return f"{flag} {model}: the folder is empty; give a model folder (config.json, weights, tokenizer) or a hub id"
    wanted = {"config.json", "adapter_config.json"} | (
        {"tokenizer.json", "tokenizer_config.json"} if tokenizer_only else set())
    if not wanted & set(names):
        return (f"{flag} {model}: no config.json in it, so it is not a Hugging Face model folder (an unfinished "
                f"download or copy?); give a model folder (config.json, weights, tokenizer) or a hub id")
    return None


def default_device():
    """The torch.device work runs on when nothing else decides: this process's current CUDA GPU when torch sees
    one (under torchrun, distributed.init_process_group made it this rank's LOCAL_RANK GPU), else the CPU."""
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(name: Optional[str]):
    """A dtype name (bfloat16, float16, float32, or ms-swift's bf16/fp16/fp32) as a torch dtype. None or "auto":
    bfloat16 on a GPU that supports it, float16 on one that does not, float32 on CPU. Raises KeyError for another
    name (parse_args checks --torch_dtype and --lora_dtype; --bnb_4bit_compute_dtype is free text)."""
    import torch

    if name in (None, "auto"):
        if default_device().type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
            "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def unwrap_model(model, peft: bool = True):
    """The transformers model inside the wrappers training puts around it: a DDP module or DeepSpeed engine
    (`.module`), then, with peft=True, a PeftModel (`get_base_model()`; its LoRA layers stay in place). A model
    without wrappers is returned as is."""
    model = getattr(model, "module", model)
    if peft and hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def load_tokenizer(cfg: ModelArgs, model_dir: Optional[str] = None):
    """The tokenizer of cfg's model (model_dir when already resolved, else --model downloaded if need be), with
    --new_special_tokens added and EOS as the pad token when it has none. cfg: the model flags of any command."""
    from transformers import AutoTokenizer

    model_dir = model_dir or resolve_model_dir(cfg.model, cfg.use_hf, cfg.model_revision, cfg.hub_token,
                                               tokenizer_only=True)
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    if cfg.new_special_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(cfg.new_special_tokens)})
    if tok.pad_token is None:
        # Padding positions are excluded by the attention mask and labels, so reusing EOS here never masks a real EOS.
        tok.pad_token = tok.eos_token
    return tok


def _quantization_config(cfg: ModelConfig, config, dtype):
    """--quant_method bnb as a BitsAndBytesConfig, an MXFP4 checkpoint's dequantising config, or None."""
    qc = getattr(config, "quantization_config", None)
    qm = (qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)) if qc else None
    if cfg.quant_method == "bnb":
        from transformers import BitsAndBytesConfig
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("--quant_method bnb needs bitsandbytes: pip install 'tunesmith[qlora]'") from None
        if cfg.quant_bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        if cfg.quant_bits not in (4, None):
            raise ConfigError("--quant_bits must be 4 or 8 with --quant_method bnb")
        compute = resolve_dtype(cfg.bnb_4bit_compute_dtype) if cfg.bnb_4bit_compute_dtype else dtype
        # the dtype the packed 4-bit weights are stored in (bitsandbytes' default uint8); ZeRO-3 needs it equal to
        # the other weights' dtype. transformers takes the name (float16, bfloat16, uint8, ...) and checks it.
        storage = cfg.bnb_4bit_quant_storage
        extra = {"bnb_4bit_quant_storage": storage} if storage else {}
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
                                  bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
                                  bnb_4bit_compute_dtype=compute, **extra)
    if qm == "mxfp4":
        # MXFP4 weights have no backward pass: dequantise to the training dtype (the seeds did this by hand).
        from transformers import Mxfp4Config
        note("MXFP4 checkpoint: dequantising the experts to the training dtype for training")
        return Mxfp4Config(dequantize=True)
    if qm == "compressed-tensors" and not _has_cuda():
        # FP8 W8A8 (tunesmith export --quant_method fp8) runs compressed only on a GPU: on a CPU the weights are
        # decompressed to the model dtype when loaded (transformers' dequantize=True)
        from transformers import CompressedTensorsConfig
        note("compressed-tensors (FP8) checkpoint on a CPU: its weights are decompressed to the model's dtype")
        return CompressedTensorsConfig(dequantize=True)
    return None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def load_model(cfg: ModelConfig, model_dir: str, tokenizer=None, for_training: bool = True,
               head: str = "causal_lm"):
    """The model at model_dir with its dtype, attention, quantisation and router-loss settings (cfg: the model
    slice, `take(ModelConfig, args)` for any command). head: "causal_lm" (AutoModelForCausalLM) or "seq_cls"
    (AutoModelForSequenceClassification with one output, a reward model: a new score head when the checkpoint has
    none; the pad id set for its last-token pooling)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from tunesmith.models.vision import check_supported, is_vision_language

    dtype = resolve_dtype(cfg.torch_dtype)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    check_supported(config, cfg.model or model_dir)
    vision = is_vision_language(config)
    kwargs = dict(cfg.model_kwargs or {})
    kwargs["dtype"] = dtype
    attn = cfg.attn_impl
    if attn:
        kwargs["attn_implementation"] = {"flash_attn": "flash_attention_2"}.get(attn, attn)
    qconf = _quantization_config(cfg, config, dtype)
    if qconf is not None:
        kwargs["quantization_config"] = qconf
    if cfg.device_map:
        kwargs["device_map"] = cfg.device_map
    coef = cfg.router_aux_loss_coef or 0.0
    if coef > 0:
        if not hasattr(config, "router_aux_loss_coef"):
            note(f"--router_aux_loss_coef {coef}: {type(config).__name__} is not a mixture-of-experts model; ignored")
        else:
            kwargs["output_router_logits"] = True
            kwargs["router_aux_loss_coef"] = coef
    with warnings.catch_warnings():
        # a dequantising config (MXFP4, compressed-tensors on a CPU) overrides the checkpoint's own on purpose
        warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
        if head == "seq_cls":
            kwargs.pop("output_router_logits", None)
            kwargs.pop("router_aux_loss_coef", None)
            from tunesmith.models.vision import sequence_classifier

            auto = sequence_classifier(config) if vision else AutoModelForSequenceClassification
            with without_load_report():  # a new score head is expected: said once below, in our words
                model, info = auto.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code,
                                                   num_labels=1, output_loading_info=True, **kwargs)
            _say_new_weights(info, cfg.model or model_dir)
        elif vision:  # transformers' own image-text class (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)
            from transformers import AutoModelForImageTextToText

            model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code,
                                                                **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code, **kwargs)
    if head == "seq_cls" and tokenizer is not None and tokenizer.pad_token_id is not None:
        # the pooling reads the pad id from the language model's config (a vision-language config nests it)
        model.config.pad_token_id = model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if for_training:
        model.config.use_cache = False
    return model


class _DropLoadReport:
    """A logging filter that drops transformers' LOAD REPORT record (the loader's table of new/unused weights)."""

    @staticmethod
    def filter(record) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def without_load_report():
    """transformers' load report (and its progress bar) left out while a model loads whose report is expected noise:
    a reward model's new score head ("Consider training on your downstream task"; `_say_new_weights` says what
    matters), a checkpoint read back for a resume, a reward model's base before its adapter."""
    from transformers.utils import logging as hf_logging
    import logging

    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(_DropLoadReport)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.removeFilter(_DropLoadReport)
        if bars:
            hf_logging.enable_progress_bar()


def _say_new_weights(info: dict, model: str) -> None:
    """A note on what a reward model's loading left untrained: the score head (a base model's: new, trained from
    here), and any other weight the checkpoint lacked (a warning: the backbone would start random there)."""
    missing = sorted(info.get("missing_keys") or ())
    head = [k for k in missing if k.split(".")[0] in ("score", "classifier")]
    other = [k for k in missing if k not in head]
    if head:
        note(f"--model {model}: a new score head ({', '.join(head)}) is trained from scratch on it (reward model)")
    if other:
        note(f"warning: --model {model}: {len(other)} weight(s) of the backbone are not in the checkpoint and start "
             f"random ({', '.join(other[:3])}{', …' if len(other) > 3 else ''}); check that it is the model meant")


def all_linear_names(model) -> list[str]:
    """Leaf names of every Linear layer except output heads and MoE routers."""
    import torch

    out_emb = model.get_output_embeddings()
    names = set()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod is not out_emb:
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in _EXCLUDED_LEAVES:
                names.add(leaf)
    return sorted(names)


def _expand_special(model, names: list[str]) -> list[str]:
    import torch

    out = []
    for n in names:
        if n == "all-embedding":
            out += sorted({k.rsplit(".", 1)[-1] for k, m in model.named_modules() if isinstance(m, torch.nn.Embedding)})
        elif n == "all-norm":
            out += sorted({k.rsplit(".", 1)[-1] for k, m in model.named_modules()
                           if "norm" in type(m).__name__.lower()})
        elif n == "all-linear":
            out += all_linear_names(model)
        else:
            out.append(n)
    return list(dict.fromkeys(out))


def cast_lora(model, dtype_name: Optional[str], adapter: str = "default") -> int:
    """--lora_dtype: cast the LoRA weights of `adapter` (A and B, their embedding forms, DoRA's magnitude) to
    float32, bfloat16 or float16, as ms-swift does after building the adapter. None leaves peft's choice (float32
    for LoRA on a float16/bfloat16 base). The base weights are never touched; peft casts each layer's input to its
    LoRA weights' dtype, so mixed dtypes stay correct. Returns the number of parameters cast."""
    if not dtype_name:
        return 0
    dtype = resolve_dtype(dtype_name)
    cast = 0
    for module in model.modules():
        for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
            holder = getattr(module, attr, None)
            if holder is None or not hasattr(holder, "keys") or adapter not in holder.keys():
                continue
            part = holder[adapter]
            if hasattr(part, "parameters"):  # a Linear/Embedding/DoRA layer
                for p in part.parameters():
                    if p.is_floating_point() and p.dtype != dtype:
                        p.data = p.data.to(dtype)
                        cast += 1
            elif part.is_floating_point() and part.dtype != dtype:  # a bare Parameter (lora_embedding_A/B)
                part.data = part.data.to(dtype)
                cast += 1
    return cast


def attach_lora(model, cfg: ModelConfig, gradient_step=None):
    """Wrap the model with a fresh LoRA adapter, or continue from --adapters (trainable); then apply --lora_dtype
    to the trained adapter's weights. gradient_step: for --init_weights lora-ga, a function of no arguments that
    runs the forward and backward passes LoRA-GA estimates the gradients from (peft's preprocess_loraga; see
    models.tuners.lora_ga_step). Raises ConfigError for several --adapters or targets that match no layer."""
    peft_model = _attach_lora(model, cfg, gradient_step)
    cast_lora(peft_model, cfg.lora_dtype)
    return peft_model


def _is_seq_cls(model) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def _attach_lora(model, cfg: ModelConfig, gradient_step=None):
    from peft import PeftModel, get_peft_model

    if cfg.quant_method:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.adapters:
        if len(cfg.adapters) > 1:
            raise ConfigError("training continues from one adapter; pass a single --adapters path")
        note(f"continuing training from adapter {cfg.adapters[0]}")
        return PeftModel.from_pretrained(model, cfg.adapters[0], is_trainable=True)
    lora = lora_config(model, cfg)
    try:
        if lora.init_lora_weights == "lora_ga":
            from peft import preprocess_loraga

            preprocess_loraga(model, lora, gradient_step)  # the gradients, kept on the layers for the init
        return get_peft_model(model, lora)
    except ValueError as e:
        if "not found in the base model" not in str(e):
            raise
        which = f"--target_regex {cfg.target_regex}" if cfg.target_regex else \
            f"--target_modules {' '.join(cfg.target_modules)}"
        raise ConfigError(f"{which} matches no layer of this model, so LoRA would have no trainable parameters. "
                          f"Its Linear layers are: {', '.join(all_linear_names(model))} (or pass all-linear)") from None


# ms-swift's --lora_ga_scale names -> peft's LoraGAConfig.scale
_LORA_GA_SCALES = {"stable": "stable", "gd": "gd_scale", "unit": "unit", "weightS": "weight_svd"}


def lora_config(model, cfg: ModelConfig):
    """The peft LoraConfig of the LoRA flags (cfg: the model slice): rank, alpha, dropout (0 for LoRA on raw
    parameters, which peft requires, with a note), targets (all-linear expanded), --init_weights (ms-swift's true,
    false and lora-ga as peft spells them; LoRA-GA's --lora_ga_* flags), the task (SEQ_CLS for a reward model: peft
    then trains its score head)."""
    from peft import LoraConfig, LoraGAConfig

    dropout = cfg.lora_dropout
    if cfg.target_parameters and dropout:
        note(f"--lora_dropout {dropout} -> 0: peft's LoRA on raw parameters (--target_parameters, MoE experts) "
             f"does not support dropout")
        dropout = 0.0
    target = cfg.target_regex or _vision_targets(model, cfg) or _expand_special(model, cfg.target_modules)
    init = {"true": True, "false": False, "lora-ga": "lora_ga"}.get(str(cfg.init_weights).lower(), cfg.init_weights)
    ga = LoraGAConfig(direction=cfg.lora_ga_direction, scale=_LORA_GA_SCALES[cfg.lora_ga_scale],
                      stable_gamma=cfg.lora_ga_stable_gamma) if init == "lora_ga" else None
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=dropout, bias=cfg.lora_bias,
                      target_modules=target, target_parameters=list(cfg.target_parameters) or None,
                      modules_to_save=_expand_special(model, cfg.modules_to_save) or None,
                      use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, init_lora_weights=init, lora_ga_config=ga,
                      task_type="SEQ_CLS" if _is_seq_cls(model) else "CAUSAL_LM")


def _vision_targets(model, cfg: ModelConfig) -> Optional[str]:
    """For a vision-language model with all-linear among --target_modules: ms-swift's regex — the Linear layers of
    the parts --freeze_vit/--freeze_aligner/--freeze_llm leave trained (default: the language model only), plus any
    other names given; None otherwise (the names apply as given)."""
    from tunesmith.models.vision import PARTS, lora_target_regex, trained_parts

    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in PARTS or "all-linear" not in cfg.target_modules:
        return None
    regex = lora_target_regex(model, PARTS[kind], trained_parts(cfg.freeze_vit, cfg.freeze_aligner,
                                                                cfg.freeze_llm))
    others = [n for n in _expand_special(model, [t for t in cfg.target_modules if t != "all-linear"])]
    return regex + "".join(rf"|.*\.{re.escape(n)}" for n in others)


def count_parameters(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "trainable_percent": round(100.0 * trainable / max(total, 1), 4)}


def refuse_reward_model(model: str, model_dir: str) -> None:
    """Raise ConfigError when --model (a hub id, downloaded to model_dir; local folders were checked with the
    checkpoint) is a reward model: generating from it would drop its score head (checkpoint.reward_model_problem)."""
    from tunesmith.models.checkpoint import reward_model_problem

    problem = reward_model_problem("--model", model, model_dir)
    if problem:
        raise ConfigError(problem)


def load_for_inference(cfg: ModelConfig, adapters: list[str], named: Optional[dict] = None, merge: bool = False,
                       quantise: bool = True, model_dir: Optional[str] = None):
    """The model to generate with: the base (quantised as trained unless quantise=False), then the adapters.

    Plain adapters are applied in order; several are merged one after another (ms-swift merges them in sequence),
    one stays a live PeftModel unless merge=True or named adapters follow (then it is merged: the served base is
    the model with its plain adapters, and the named ones apply on top). Named adapters (deploy's name=path) are
    loaded side by side and chosen per request. cfg: the model slice of the (checkpoint-resolved) command;
    model_dir: cfg.model's folder when the caller resolved it already. Returns (model, tokenizer, model_dir)."""
    from peft import PeftModel

    if model_dir is None:
        model_dir = resolve_model_dir(cfg.model, cfg.use_hf, cfg.model_revision, cfg.hub_token)
    refuse_reward_model(cfg.model, model_dir)
    tokenizer = load_tokenizer(cfg, model_dir)
    if not quantise and cfg.quant_method:
        cfg = dataclasses.replace(cfg, quant_method=None)  # merging always goes into the unquantised base weights
    model = load_model(cfg, model_dir, tokenizer, for_training=False)
    for path in adapters:
        model = PeftModel.from_pretrained(model, path)
        if merge or len(adapters) > 1 or named:  # named adapters go on top of the plain ones, merged
            model = model.merge_and_unload()
    if named:
        model = _load_side_by_side(model, named, cfg.model)
    model.eval()
    return model, tokenizer, model_dir


def _load_side_by_side(model, named: dict, base: str):
    """deploy's named adapters {name: path} loaded into one PeftModel, each chosen per row of a batch (peft's
    adapter_names). Raises ConfigError for an adapter whose weights do not fit the model (another base)."""
    from peft import PeftModel

    for i, (name, path) in enumerate(named.items()):
        try:
            if i == 0:
                model = PeftModel.from_pretrained(model, path, adapter_name=name)
            else:
                model.load_adapter(path, adapter_name=name)
        except RuntimeError as e:
            if "size mismatch" not in str(e):
                raise
            raise ConfigError(f"--adapters {name}={path}: its weights do not fit {base} ("
                              f"{str(e).strip().splitlines()[-1].strip()}); it was trained on another base "
                              f"model. Serve it with its own --model") from None
    share_saved_modules(model)
    return model


def share_saved_modules(model) -> int:
    """Give every adapter of a multi-adapter PeftModel an entry in every module another adapter saved whole
    (--modules_to_save: embed_tokens, lm_head, ...): the base module itself, shared, not a copy.

    peft keeps such a module per adapter (ModulesToSaveWrapper) and, in a batch that picks adapters per row,
    looks each row's adapter up in it: an adapter that did not train the module raised KeyError on every request
    (peft #1378), and while the active adapter lacked it the wrapper fell back to the base module for every row,
    silently dropping the other adapter's trained module. An adapter without the module computes it with the base
    module in a lone run, so the shared entry is exact and costs no memory. Returns the entries added. Raises
    ConfigError for a wrapper that cannot be shared this way (peft's trainable-token deltas)."""
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    names = list(getattr(model, "peft_config", {}) or {})
    added = 0
    for where, wrapper in list(model.named_modules()):
        if not isinstance(wrapper, AuxiliaryTrainingWrapper):
            continue
        missing = [n for n in names if n not in wrapper._get_available_adapters()]
        if missing and not isinstance(wrapper, ModulesToSaveWrapper):
            raise ConfigError(f"adapters {', '.join(missing)} lack the {type(wrapper).__name__} of {where} that "
                              f"another adapter trained; serve them on separate servers")
        for name in missing:
            wrapper.modules_to_save[name] = wrapper.original_module  # present: update() makes no copy
            wrapper.update(name)
            added += 1
        wrapper.original_module.requires_grad_(False)
    return added
