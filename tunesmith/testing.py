"""Tiny models, built offline in seconds, for tests, the demo and benchmarks (never imported by tunesmith itself).
Their tokenizers and chat templates are tunesmith.data.tiny_tokenizer's.

Usage: ``python -m tunesmith.testing OUT_DIR [--family qwen2|qwen3|llama|gpt_oss|qwen2_5_vl|...] [--hidden 64]
[--layers 2] [--seed 0] [--colour_rows FILE]``.
"""
from __future__ import annotations

import argparse
import os

from tunesmith.data.tiny_tokenizer import (  # noqa: F401 - re-exported for tests and bench
    CHATML_TEMPLATE, FAMILIES, VL_FAMILIES, GPT_OSS_TEMPLATE, LLAMA3_TEMPLATE, OFFICIAL_TEMPLATES, PLAIN_ADDED_TOKENS, QWEN3_TEMPLATE,
    SPECIAL_TOKENS, build_tokenizer, load_official_template)


def build_config(family: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                 intermediate: int | None = None, max_positions: int = 4096):
    import transformers as tf

    intermediate = intermediate or hidden * 2
    kv = max(1, heads // 2)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                  max_position_embeddings=max_positions)
    if family in ("qwen2", "chatml"):
        return tf.Qwen2Config(**common, tie_word_embeddings=True)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=hidden // heads, tie_word_embeddings=True)
    if family in ("llama", "llama3"):
        return tf.LlamaConfig(**common, tie_word_embeddings=False)
    if family == "gpt_oss":
        return tf.GptOssConfig(**{**common, "intermediate_size": hidden}, head_dim=hidden // heads,
                               num_local_experts=4, num_experts_per_tok=2, sliding_window=128,
                               layer_types=["sliding_attention", "full_attention"] * (layers // 2) +
                               ["full_attention"] * (layers % 2),
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                               tie_word_embeddings=False)
    raise ValueError(f"unknown family {family!r}")


def build_model(out_dir: str, family: str = "qwen2", hidden: int = 64, layers: int = 2, heads: int = 4,
                intermediate: int | None = None, vocab_size: int = 2048, seed: int = 0,
                model_vocab: int | None = None, official_template: bool = False) -> str:
    """Save a random model + tokenizer as a normal HF directory at out_dir; return the path. `model_vocab` widens
    the embedding/output layer beyond the tokenizer (benchmarks: a realistic vocabulary-sized logits cost)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok = build_tokenizer(family, vocab_size, official_template=official_template)
    config = build_config(family, max(len(tok), model_vocab or 0), hidden, layers, heads, intermediate)
    config.eos_token_id = tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    if tok.bos_token_id is not None:
        config.bos_token_id = tok.bos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    eos = tok.eos_token_id
    if family == "gpt_oss":  # as gpt-oss ships it: a reply ends at <|return|> (answer) or <|call|> (tool call)
        eos = [tok.convert_tokens_to_ids("<|return|>"), tok.convert_tokens_to_ids("<|call|>")]
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id,
                                               bos_token_id=tok.bos_token_id)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


# The tiny vision towers' image budget: 28-pixel merged patches (Qwen2/2.5-VL; 32 for Qwen3-VL), 4 to 16 image
# tokens per picture, so a test image costs a handful of tokens.
VL_MIN_TOKENS, VL_MAX_TOKENS = 4, 16


def build_vl_config(family: str, tok, hidden: int = 64, layers: int = 2, heads: int = 4,
                    intermediate: int | None = None, vision_hidden: int = 32, vision_depth: int = 2):
    """The config of a tiny vision-language model of `family` (qwen2_vl, qwen2_5_vl, qwen3_vl) around the
    tokenizer `tok` (tiny_tokenizer's, with the vision tokens)."""
    import transformers as tf

    intermediate = intermediate or hidden * 2
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=4096,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    ids = dict(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
               video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
               vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
               vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_heads=2,
                  out_hidden_size=hidden, spatial_merge_size=2, temporal_patch_size=2)
    section = [hidden // heads // 2 - 2 * (hidden // heads // 8), hidden // heads // 8, hidden // heads // 8]
    if family == "qwen2_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}
        return tf.Qwen2VLConfig(text_config=text, vision_config=dict(
            depth=vision_depth, embed_dim=vision_hidden, hidden_size=hidden, mlp_ratio=2, num_heads=2,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2), tie_word_embeddings=True, **ids)
    if family == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}
        return tf.Qwen2_5_VLConfig(text_config=text, vision_config=dict(
            **vision, patch_size=14, window_size=56, fullatt_block_indexes=[vision_depth - 1]),
            tie_word_embeddings=True, **ids)
    if family == "qwen3_vl":
        text.update(head_dim=hidden // heads, rope_parameters={
            "rope_type": "default", "rope_theta": 5e6, "mrope_section": section, "mrope_interleaved": True})
        return tf.Qwen3VLConfig(text_config=text, vision_config=dict(
            **vision, patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[vision_depth - 1]),
            tie_word_embeddings=True, **ids)
    raise ValueError(f"unknown vision-language family {family!r}; choose from {', '.join(VL_FAMILIES)}")


def build_vl_model(out_dir: str, family: str = "qwen2_5_vl", hidden: int = 64, layers: int = 2, heads: int = 4,
                   vocab_size: int = 2048, seed: int = 0) -> str:
    """Save a random vision-language model (transformers' own class for `family`), its tokenizer (with the vision
    tokens and the Qwen-VL chat template) and its image processor's config as a normal HF directory; return it.
    Pictures cost VL_MIN_TOKENS..VL_MAX_TOKENS image tokens each."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig, Qwen2VLImageProcessorPil

    tok = build_tokenizer(family, vocab_size)
    config = build_vl_config(family, tok, hidden, layers, heads)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    patch = config.vision_config.patch_size
    unit = (patch * 2) ** 2  # pixels per merged 2x2 patch = one image token
    processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                         size={"shortest_edge": VL_MIN_TOKENS * unit,
                                               "longest_edge": VL_MAX_TOKENS * unit})
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


DEMO_COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 220)}


def write_colour_rows(path: str, n: int = 12, seed: int = 0) -> str:
    """A demo image dataset: n rows "what colour is this?" (ms-swift's form: an `<image>` tag and `images`) over
    solid-colour PNG pictures of a few sizes, written next to the JSON-lines file `path`. Returns path."""
    import json
    import random

    from PIL import Image

    rng = random.Random(seed)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            name = rng.choice(sorted(DEMO_COLOURS))
            picture = os.path.join(folder, f"colour-{i}.png")
            Image.new("RGB", rng.choice([(56, 56), (84, 56), (112, 84)]), DEMO_COLOURS[name]).save(picture)
            fh.write(json.dumps({"messages": [{"role": "user", "content": "<image>What colour is this?"},
                                              {"role": "assistant", "content": name}],
                                 "images": [os.path.relpath(picture)]}) + "\n")
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description="Build a tiny random model + tokenizer directory.")
    p.add_argument("out_dir")
    p.add_argument("--family", default="qwen2", choices=sorted(FAMILIES))
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--model_vocab", type=int, default=None, help="embedding rows (>= the tokenizer's)")
    p.add_argument("--seed", type=int, default=0, help="the random weights' seed (another seed: another model with "
                                                       "the same tokenizer, e.g. a GKD teacher)")
    p.add_argument("--colour_rows", default=None, metavar="FILE",
                   help="also write a demo image dataset (rows with pictures) to this JSON-lines file")
    p.add_argument("--official_template", action="store_true",
                   help="the real model's chat template (renders tool calls) instead of the compact one")
    a = p.parse_args(argv)
    if a.colour_rows:
        write_colour_rows(a.colour_rows)
    if a.family in VL_FAMILIES:
        print(build_vl_model(a.out_dir, a.family, a.hidden, a.layers, a.heads, a.vocab))
        return
    path = build_model(a.out_dir, a.family, a.hidden, a.layers, a.heads, a.intermediate, a.vocab, seed=a.seed,
                       model_vocab=a.model_vocab, official_template=a.official_template)
    print(path)


if __name__ == "__main__":
    main()
