"""The generation engine's side of vision-language models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): what it needs of the
model (`EngineVision`), the check of a prompt's pictures before it joins a batch, and the prefill inputs of a
batch with pictures — pixels, and 3-D M-RoPE positions from the model's own get_rope_index with each row's rope
delta, so that rows with and without pictures decode together (tunesmith.inference.engine).

What must not live here: reading or counting pictures (tunesmith.data.vision, tunesmith.data.images).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class EngineVision:
    """What the engine needs of a vision-language model: its image placeholder id, the vision tower's merge size
    (merge² patches make one image token), its M-RoPE position function (transformers' `get_rope_index`:
    (input_ids [B, T], mm_token_type_ids, image_grid_thw, attention_mask) -> (positions [3, B, T], deltas [B, 1]))
    and the placeholder ids (image, video) it must never sample: a generated one would be a placeholder without a
    picture in the next prompt or training batch, which the model refuses ("Image features and image tokens do not
    match")."""
    image_token_id: int
    merge: int
    rope_index: Any
    placeholders: tuple


def engine_vision(model) -> Optional[EngineVision]:
    """The EngineVision of a vision-language model (a config with a vision_config and an image_token_id, a
    `model.get_rope_index`), also under peft; None for any other model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    rope_index = getattr(getattr(base, "model", None), "get_rope_index", None)
    token = getattr(cfg, "image_token_id", None)
    if getattr(cfg, "vision_config", None) is None or rope_index is None or token is None:
        return None
    placeholders = tuple(int(t) for t in (token, getattr(cfg, "video_token_id", None)) if t is not None)
    return EngineVision(int(token), int(cfg.vision_config.spatial_merge_size), rope_index, placeholders)


def check_images(vision: Optional[EngineVision], prompt_ids: list, images: Optional[dict]) -> None:
    """Raise ValueError unless the prompt's pictures fit the model and the prompt: a text-only model takes none;
    a vision-language model's prompt holds exactly as many image placeholders as its pictures make tokens
    (grid_t·grid_h·grid_w / merge² each) and pixel_values has a row per patch (a literal `<|image_pad|>` typed in
    a text prompt is refused here too, before it could fail the batch)."""
    if vision is None:
        raise ValueError("this model takes text only (it has no vision tower), so a prompt with pictures cannot "
                         "be answered; serve a vision-language model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)")
    placeholders = sum(1 for t in prompt_ids if t == vision.image_token_id)
    tokens, patches = 0, 0
    if images:
        grid = images["image_grid_thw"]
        patches = int(grid.prod(-1).sum())
        tokens = patches // vision.merge ** 2
        if int(images["pixel_values"].shape[0]) != patches:
            raise ValueError(f"pixel_values has {int(images['pixel_values'].shape[0])} rows but image_grid_thw "
                             f"{grid.tolist()} makes {patches} patches")
    if placeholders != tokens:
        raise ValueError(f"the prompt holds {placeholders} image placeholder token(s) but its "
                         f"{0 if not images else len(images['image_grid_thw'])} picture(s) make {tokens}: each "
                         f"picture's placeholder must be repeated once per image token "
                         f"(tunesmith.data.vision.expand_images), and a text prompt may not hold any")


def prefill_inputs(vision: EngineVision, handles: list, ids, mask, device) -> tuple[dict, Any, list[int]]:
    """For a prefill batch with pictures (ids, mask [B, T], left-padded; handles: the rows' engine handles, whose
    `images` are let go here): (the vision tower's inputs — pixel_values [P, D] and image_grid_thw [N, 3], every
    row's pictures in row order —, M-RoPE position ids [3, B, T] from the model's own get_rope_index (padding 0; a
    text row's plain positions on all three axes), each row's rope delta: its M-RoPE position after the prompt minus
    its length, 0 for a text row)."""
    import torch

    pictures = [h.images for h in handles if h.images]
    for h in handles:
        h.images = None
    grid = torch.cat([p["image_grid_thw"] for p in pictures]).to(device)
    pixels = torch.cat([p["pixel_values"] for p in pictures]).to(device)
    kinds = (ids == vision.image_token_id).int()  # transformers' mm_token_type_ids: 1 = image
    pos, deltas = vision.rope_index(ids, mm_token_type_ids=kinds, image_grid_thw=grid, attention_mask=mask)
    return {"pixel_values": pixels, "image_grid_thw": grid}, pos, [int(d) for d in deltas.flatten().tolist()]
