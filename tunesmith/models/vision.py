"""Vision-language models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): which checkpoints take images, their parts (vision
tower, aligner, language model) for --freeze_vit/--freeze_aligner/--freeze_llm, LoRA's all-linear and
--vit_lr/--aligner_lr, and their image budget (--max_pixels, MAX_PIXELS, IMAGE_MAX_TOKEN_NUM) as the encoder counts
it (tunesmith.data.vision.ImageTokens).

The parts are ms-swift's (swift/model/model_arch.py, transformers >= 4.52 names): vision tower `model.visual`,
aligner `model.visual.merger` (+ `model.visual.deepstack_merger_list` for Qwen3-VL), language model
`model.language_model` and `lm_head`. The models themselves are transformers' own classes
(AutoModelForImageTextToText); their image processor is transformers' too, loaded without the processor class
(which would need torchvision; see tunesmith.data.vision).
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Optional

from tunesmith.errors import ConfigError


@dataclass(frozen=True)
class VisionParts:
    """Parameter-name prefixes of a vision-language model's three parts (of the transformers model, before peft)."""
    vision_tower: tuple[str, ...]
    aligner: tuple[str, ...]
    language_model: tuple[str, ...]


_QWEN_VL = VisionParts(("model.visual",), ("model.visual.merger",), ("model.language_model", "lm_head"))
PARTS = {
    "qwen2_vl": _QWEN_VL,
    "qwen2_5_vl": _QWEN_VL,
    "qwen3_vl": VisionParts(("model.visual",), ("model.visual.merger", "model.visual.deepstack_merger_list"),
                            ("model.language_model", "lm_head")),
}
# The families whose images tunesmith counts, expands and feeds (placeholder expansion and M-RoPE as these models
# define them); other image-text models are refused by name.
SUPPORTED = tuple(PARTS)


# What a vision-language checkpoint needs besides the weights and the tokenizer to be loaded again: the image (and
# video) processors' settings, the processor's own config and its chat template file.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json")


def copy_processor_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copy PROCESSOR_FILES that src_dir (the base model's folder) has, and dst_dir (a checkpoint, a merged model)
    lacks, into dst_dir; returns the names copied. A text model has none: nothing happens."""
    import shutil

    copied = []
    for name in PROCESSOR_FILES:
        src, dst = os.path.join(src_dir, name), os.path.join(dst_dir, name)
        if os.path.isfile(src) and not os.path.exists(dst):
            shutil.copyfile(src, dst)
            copied.append(name)
    return copied


def is_vision_language(config) -> bool:
    """Whether a transformers config is an image-text model's (it has a vision tower's config)."""
    return getattr(config, "vision_config", None) is not None


def check_supported(config, model: str) -> None:
    """Raise ConfigError for an image-text model outside SUPPORTED (named, with what to use instead)."""
    kind = getattr(config, "model_type", "?")
    if is_vision_language(config) and kind not in PARTS:
        raise ConfigError(f"--model {model}: {kind} is a vision-language model, which tunesmith does not train or "
                          f"serve yet (supported: {', '.join(SUPPORTED)}: Qwen2-VL, Qwen2.5-VL, Qwen3-VL)")


def text_config(config):
    """The language model's config (a vision-language config nests it as text_config)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def sequence_classifier(config):
    """The sequence-classification class (a reward model's: a score head over the final hidden state of each
    sequence's last non-pad token) of a supported vision-language family, e.g. Qwen2_5_VLForSequenceClassification.

    transformers 5.25 ships none for Qwen-VL, so it is composed as transformers composes its text ones
    (`Qwen2ForSequenceClassification(GenericForSequenceClassification, Qwen2PreTrainedModel)`): the family's own
    base model (pictures, M-RoPE) under `model`, a bias-free `score` Linear [hidden → num_labels]. Its weights are
    the generation class's without `lm_head`, so it loads the base checkpoint (score new) and, with the generation
    class's checkpoint-layout conversion registered under its name (transformers' register_checkpoint_conversion_
    mapping), saves the layout ms-swift's seq_cls reward models have (`model.*`, `visual.*`, `score.weight`, config
    architectures `…ForSequenceClassification`), so either reads the other's. One class per family (cached)."""
    return _sequence_classifier(type(config))


@functools.cache
def _sequence_classifier(config_class):
    from transformers import AutoModelForImageTextToText, PreTrainedModel
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping, \
        register_checkpoint_conversion_mapping
    from transformers.modeling_layers import GenericForSequenceClassification

    generation = AutoModelForImageTextToText._model_mapping[config_class]
    base = next(c for c in generation.__mro__[1:] if issubclass(c, PreTrainedModel)
                and c.__name__.endswith("PreTrainedModel"))
    name = generation.__name__.replace("ForConditionalGeneration", "ForSequenceClassification")
    cls = type(name, (GenericForSequenceClassification, base), {"__module__": __name__})
    layout = get_checkpoint_conversion_mapping(generation.__name__)
    if layout and get_checkpoint_conversion_mapping(name) is None:
        register_checkpoint_conversion_mapping(name, layout)
    return cls


def part_of(name: str, parts: VisionParts) -> str:
    """Which part a parameter or module name belongs to: "aligner", "vision_tower", "language_model" or "other".
    peft's `base_model.model.` prefix is ignored; the aligner is tested first (it sits inside the vision tower)."""
    name = name[len("base_model.model."):] if name.startswith("base_model.model.") else name

    def under(prefixes):
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    if under(parts.aligner):
        return "aligner"
    if under(parts.vision_tower):
        return "vision_tower"
    if under(parts.language_model):
        return "language_model"
    return "other"


def trained_parts(freeze_vit: bool, freeze_aligner: bool, freeze_llm: bool) -> set[str]:
    """The parts --freeze_vit/--freeze_aligner/--freeze_llm leave trained. Raises ConfigError when all are frozen."""
    out = {p for p, frozen in (("vision_tower", freeze_vit), ("aligner", freeze_aligner),
                               ("language_model", freeze_llm)) if not frozen}
    if not out:
        raise ConfigError("--freeze_vit, --freeze_aligner and --freeze_llm are all true: nothing would train; set "
                          "one of them false (ms-swift's defaults: --freeze_llm false)")
    return out


def lora_target_regex(model, parts: VisionParts, trained: set[str]) -> str:
    """peft's target_modules regex (re.fullmatch on module names) for LoRA on every Linear layer of the trained
    parts, never the output head — ms-swift's get_multimodal_target_regex: with the default --freeze_vit and
    --freeze_aligner true, the language model's layers only. One alternative per part:
    `(?!aligner)part\\..*\\.(leaf|leaf…)`. Raises ConfigError when no Linear layer is in the trained parts."""
    import torch

    out_emb = model.get_output_embeddings()
    leaves: dict[str, set] = {}
    prefix_of: dict[str, str] = {}
    for name, mod in model.named_modules():
        where = part_of(name, parts)
        if isinstance(mod, torch.nn.Linear) and mod is not out_emb and where in trained:
            prefix = next(p for p in getattr(parts, where) if name.startswith(p + "."))
            leaves.setdefault(prefix, set()).add(name.rsplit(".", 1)[-1])
            prefix_of[prefix] = where
    if not leaves:
        raise ConfigError(f"LoRA (all-linear) finds no Linear layer in the trained parts ({', '.join(sorted(trained))})"
                          f"; check --freeze_vit/--freeze_aligner/--freeze_llm")
    skip = "|".join(re.escape(a) for a in parts.aligner) if "aligner" not in trained else ""
    out = []
    for prefix, names in sorted(leaves.items()):
        guard = f"(?!{skip})" if skip and prefix_of[prefix] == "vision_tower" else ""
        out.append(f"{guard}{re.escape(prefix)}\\..*\\.({'|'.join(sorted(names))})")
    return "|".join(out)


def freeze_parts(model, parts: VisionParts, trained: set[str]) -> int:
    """Full fine-tuning: freeze every parameter of the parts not in `trained` (ms-swift's _init_multimodal_full);
    returns the number of parameters frozen."""
    frozen = 0
    for name, p in model.named_parameters():
        where = part_of(name, parts)
        if where != "other" and where not in trained and p.requires_grad:
            p.requires_grad_(False)
            frozen += 1
    return frozen


def pixel_limits(processor, patch_size: int, merge_size: int, max_pixels: Optional[int],
                 environ: Optional[dict] = None) -> dict:
    """The image budget in pixels: {"max_pixels", "min_pixels"} from --max_pixels, else ms-swift's environment
    variables MAX_PIXELS / MIN_PIXELS, else Qwen3-VL's IMAGE_MAX_TOKEN_NUM / IMAGE_MIN_TOKEN_NUM (tokens; one token
    is a merged (patch_size·merge_size)² block), else the checkpoint's image processor. Raises ConfigError for a
    value that is not a positive integer or min above max."""
    env = os.environ if environ is None else environ
    unit = (patch_size * merge_size) ** 2

    def read(flag_value, pixels_var, tokens_var, default):
        if flag_value is not None:
            return int(flag_value), "--max_pixels"
        for var, scale in ((pixels_var, 1), (tokens_var, unit)):
            if env.get(var):
                try:
                    value = int(env[var])
                except ValueError:
                    value = 0
                if value <= 0:
                    raise ConfigError(f"{var}={env[var]!r}: expected a positive whole number"
                                      + (" of image tokens" if scale > 1 else " of pixels"))
                return value * scale, var
        return int(default), "the model's image processor"

    size = processor.size
    top, top_src = read(max_pixels, "MAX_PIXELS", "IMAGE_MAX_TOKEN_NUM", size["longest_edge"])
    low, low_src = read(None, "MIN_PIXELS", "IMAGE_MIN_TOKEN_NUM", size["shortest_edge"])
    if top < unit or low <= 0:
        raise ConfigError(f"max_pixels {top} ({top_src}) is below one image token ({unit} pixels: a "
                          f"{patch_size * merge_size}x{patch_size * merge_size} block); raise it" if top < unit else
                          f"min_pixels {low} ({low_src}) must be positive")
    if low > top and low_src == "the model's image processor":
        low = top  # a budget below the checkpoint's own minimum: every picture resized to at most max_pixels
    if low > top:
        raise ConfigError(f"min_pixels {low} ({low_src}) is above max_pixels {top} ({top_src}); lower {low_src} or "
                          f"raise {top_src}")
    return {"max_pixels": top, "min_pixels": low}


def image_tokens(model_dir: str, config, tokenizer, max_pixels: Optional[int] = None):
    """The encoder's ImageTokens (tunesmith.data.vision) for the vision-language model at model_dir: its
    image processor (transformers', PIL backend: no torchvision) resized within the budget (`pixel_limits`), the
    placeholder token its template renders. Raises ConfigError when the tokenizer lacks the placeholder."""
    from transformers import AutoImageProcessor
    from tunesmith.data.vision import ImageTokens

    probe = AutoImageProcessor.from_pretrained(model_dir)
    patch, merge = int(probe.patch_size), int(probe.merge_size)
    limits = pixel_limits(probe, patch, merge, max_pixels)
    processor = AutoImageProcessor.from_pretrained(model_dir, size={"longest_edge": limits["max_pixels"],
                                                                    "shortest_edge": limits["min_pixels"]})
    token_id = getattr(config, "image_token_id", None)
    if token_id is None:
        token_id = getattr(config, "image_token_index", None)
    token = tokenizer.convert_ids_to_tokens(int(token_id)) if token_id is not None else None
    if token is None:
        raise ConfigError(f"{model_dir}: the config names no image token the tokenizer has (image_token_id "
                          f"{token_id}); the checkpoint's tokenizer does not match its model")
    return ImageTokens(image_token=token, image_token_id=int(token_id), merge_size=merge,
                       model_type=getattr(config, "model_type", "?"), limits=limits, processor=processor)
