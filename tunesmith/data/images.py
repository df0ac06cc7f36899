"""(placeholder until the data-rows branch lands: replaced by it)"""
from __future__ import annotations

IMAGE_TAG = "<image>"


class ImageError(ValueError):
    pass


def _open(ref):
    import base64, io
    from PIL import Image
    if ref.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(ref.split(",", 1)[1])))
    if ref.startswith("file://"):
        ref = ref[7:]
    try:
        return Image.open(ref)
    except (OSError, ValueError) as e:
        raise ImageError(f"{ref}: {e}") from None


def image_size(ref):
    return _open(ref).size


def open_image(ref):
    im = _open(ref)
    im.load()
    return im.convert("RGB")
