"""Images in encoded rows: how many tokens each picture takes, the expansion of the template's image placeholder into
them, and the pixels a batch feeds the vision tower.

A vision-language chat template (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) renders one placeholder token per image
(`<|vision_start|><|image_pad|><|vision_end|>`); the model's processor then repeats the placeholder once per merged
patch of the resized picture: grid_t·grid_h·grid_w / merge_size² tokens (transformers' Qwen2_5_VLProcessor,
`replace_image_token`). tunesmith does the same expansion on the token ids, from each image's size alone (its header:
no pixels are decoded to encode a dataset), with the model's own image processor counting the patches — so the
encoding cache, `--max_length` and `data stats` count image tokens before any pixel reaches a model. The pixels are
read only when a batch is built (`pixel_inputs`), by the same image processor.

Why not the processor class itself: transformers' Qwen-VL *processor* classes load a video processor that needs
torchvision, whose registry wheels are CUDA builds that fail against a CPU-only torch; the image processor alone
(`Qwen2VLImageProcessorPil`) does not. docs/vision.md says what this means for users.

What lives here: ImageTokens (the per-model counting and expansion), pixel_inputs. What must not: reading image
files (`tunesmith.data.images`), model code (`tunesmith.models.vision`). torch is imported inside functions only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from tunesmith.errors import DataError


@dataclass(frozen=True)
class ImageTokens:
    """One vision-language model's image tokens.

    image_token / image_token_id: the placeholder its template renders once per image (`<|image_pad|>`).
    merge_size: patches merged into one token per side (2 for the Qwen-VL families).
    processor: the model's image processor (transformers; resizes within min_pixels..max_pixels and counts patches).
    model_type: the config's model_type, for messages. limits: {"max_pixels", "min_pixels"} as resolved (pixels)."""
    image_token: str
    image_token_id: int
    merge_size: int
    model_type: str
    limits: dict
    processor: Any = field(compare=False, repr=False)

    def count(self, width: int, height: int) -> int:
        """Image tokens of a width x height (pixels) picture after the processor's resize (smart_resize): its
        patches / merge_size²."""
        patches = self.processor.get_number_of_image_patches(height, width, {})
        return int(patches) // (self.merge_size ** 2)

    def tokens_of(self, ref: str) -> int:
        """Image tokens of the picture at `ref` (a path, file:// or data: URL), from its header only.
        Raises tunesmith.data.images.ImageError when it cannot be read, or the image processor cannot resize it
        (Qwen-VL's smart_resize refuses an aspect ratio over 200:1)."""
        from tunesmith.data.images import ImageError, image_size

        width, height = image_size(ref)
        try:
            return self.count(width, height)
        except ValueError as e:
            raise ImageError(ref, f"{width}x{height} pixels: the model's image processor cannot resize it "
                                  f"({str(e).strip()}).", "crop or pad the picture to a less extreme shape.") from None

    def fingerprint(self) -> dict:
        """What an encoding depends on besides the tokenizer: the placeholder and the pixel limits."""
        return {"image_token": self.image_token, "merge": self.merge_size,
                "patch": getattr(self.processor, "patch_size", None), **self.limits}


def expand_images(ids: list[int], labels: list[int], images: list[str], spec: ImageTokens,
                  field_name: str = "images") -> tuple[list[int], list[int], list[int]]:
    """The rendering's token ids [T] and labels [T] with each image placeholder repeated as many times as its
    picture has tokens; those positions are never trained (labels -100). Returns (ids, labels, tokens per image).

    Raises DataError (no source: the caller adds it) when the template rendered a different number of placeholders
    than the row has images, or a picture cannot be read (tunesmith.data.images.ImageError's reason)."""
    from tunesmith.data.images import ImageError, describe

    where = [i for i, t in enumerate(ids) if t == spec.image_token_id]
    if len(where) != len(images):
        raise DataError("", None, field_name, f"the chat template rendered {len(where)} image placeholder(s) "
                        f"({spec.image_token}) for {len(images)} image(s).",
                        "give one <image> tag per image, in user messages.")
    counts = []
    for ref in images:
        try:
            counts.append(spec.tokens_of(ref))
        except ImageError as e:
            raise DataError("", None, field_name, f"image {describe(e.ref)}: {e.reason}",
                            e.fix or "fix or remove the image.") from None
    out_ids: list[int] = []
    out_labels: list[int] = []
    prev = 0
    for pos, n in zip(where, counts):
        out_ids += ids[prev:pos] + [spec.image_token_id] * n
        out_labels += labels[prev:pos] + [-100] * n
        prev = pos + 1
    return out_ids + ids[prev:], out_labels + labels[prev:], counts


def pixel_inputs(image_lists: list[Optional[list[str]]], spec: ImageTokens) -> dict:
    """The vision tower's inputs for a batch whose sequences hold these pictures (one list per sequence, in the
    order of their placeholders; None or [] for a text-only one): {"pixel_values": [P, C·t·p·p] float32 patches,
    "image_grid_thw": [N, 3] int64 (frames, rows, columns of patches per picture)}, N the pictures in sequence
    order; {} when there are none. Decodes the pictures now (tunesmith.data.images.open_image) and drops them after.
    Raises tunesmith.data.images.ImageError for a picture that no longer reads."""
    import numpy as np
    import torch
    from tunesmith.data.images import open_image

    refs = [r for refs in image_lists if refs for r in refs]
    if not refs:
        return {}
    out = spec.processor([open_image(r) for r in refs])
    return {"pixel_values": torch.from_numpy(np.asarray(out["pixel_values"], dtype=np.float32)),
            "image_grid_thw": torch.as_tensor(np.asarray(out["image_grid_thw"]), dtype=torch.long)}


class WithPixels:
    """A collate function whose batches also carry the vision tower's inputs: the inner collate's "images" (each
    sequence's picture references, `collate._images`) become `pixel_inputs`' "pixel_values" and "image_grid_thw".
    Picklable, so DataLoader workers decode the pictures."""

    def __init__(self, collate, spec: ImageTokens):
        self.collate, self.spec = collate, spec

    def __call__(self, rows) -> dict:
        batch = self.collate(rows)
        images = batch.pop("images", None)
        if images:
            batch.update(pixel_inputs(images, self.spec))
            batch["image_counts"] = [len(x or ()) for x in images]  # pictures per sequence (`slice_sequences`)
        return batch


def with_pixels(collate, spec: Optional[ImageTokens]):
    """`collate` wrapped in WithPixels for a vision-language model (spec given), else `collate` itself."""
    return WithPixels(collate, spec) if spec is not None else collate


def slice_sequences(batch: dict, lo: int, hi: int, keys=("input_ids", "attention_mask", "labels")) -> dict:
    """Sequences lo..hi-1 of a padded batch: `keys` [B, T] sliced to [hi-lo, T], and with pictures their own
    pixel_values rows and image_grid_thw (WithPixels' `image_counts` says which pictures are whose)."""
    out = {k: batch[k][lo:hi] for k in keys}
    counts = batch.get("image_counts")
    if counts and sum(counts[lo:hi]):
        first, last = sum(counts[:lo]), sum(counts[:hi])
        grids = batch["image_grid_thw"]
        patches = grids.prod(-1).tolist()
        a, b = sum(patches[:first]), sum(patches[:last])
        out.update(pixel_values=batch["pixel_values"][a:b], image_grid_thw=grids[first:last],
                   image_counts=counts[lo:hi])
    return out
