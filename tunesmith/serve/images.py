"""The pictures of `tunesmith deploy`'s requests: the URLs of OpenAI `image_url` parts made into picture references
the engine reads (`tunesmith.inference.chat.ChatEngine.prompt`), each checked before any pixel is decoded.

- `data:image/...;base64,...` URLs: the base64 must decode, to at most `max_bytes` bytes (the server's picture limit,
  --max_request_bytes unless create_app is told otherwise).
- http(s) URLs: fetched with a short timeout (FETCH_TIMEOUT_S for the whole download) and the same byte limit, then
  passed on as a data URL. Where the server has no network, or the address does not answer, the request gets a 400
  naming the URL; the server fetches what clients name, so keep it off networks whose addresses clients must not
  reach (as with vLLM's and ms-swift's servers).
- Anything else (a path, file://) is refused: a client must never make the server read its own files.

Each picture's header must read as an image (tunesmith.data.images.image_size) of at most PIL's
`Image.MAX_IMAGE_PIXELS` pixels (its decompression-bomb limit, ~89 megapixels), so that a small file that would
decode to gigabytes is refused before it is decoded. Errors are ApiError 400s in OpenAI's shape, naming the part
(param messages[i].content[k].image_url).

Everything here blocks (network, base64, headers): the routes run it in a worker thread, never on the event loop.
What must not live here: rendering and the vision tower's pixel inputs (`tunesmith.inference.chat`), reading the
pictures themselves (`tunesmith.data.images`). No torch import.
"""
from __future__ import annotations

import base64
import binascii
import time

from tunesmith.serve.protocol import ApiError

FETCH_TIMEOUT_S = 10.0   # the whole download of one http(s) picture, seconds
_CHUNK = 1 << 16


def resolve_images(urls: list[tuple[str, str]], max_bytes: int) -> list[str]:
    """[(param, url)] (protocol.image_urls) -> the pictures as references the engine reads: data URLs (an http(s)
    picture is fetched and encoded as one), in order. max_bytes: the most decoded bytes one picture may have.

    Raises ApiError 400: code invalid_image_url (a scheme other than data/http/https, a fetch that fails or times
    out), image_too_large (over max_bytes or PIL's pixel limit), invalid_image (base64 that does not decode, bytes
    that are not a picture)."""
    return [_resolve(param, url, max_bytes) for param, url in urls]


def _resolve(param: str, url: str, max_bytes: int) -> str:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        ref = _data_url(param, url, max_bytes)
    elif scheme in ("http", "https"):
        raw, kind = _fetch(param, url, max_bytes)
        ref = f"data:{kind};base64," + base64.b64encode(raw).decode("ascii")
    else:
        raise ApiError(400, f"{param}: an image URL must be a data URL (data:image/png;base64,...) or an http(s) URL"
                            + (f", not {scheme}:" if scheme else "; this is neither (a path?)"),
                       code="invalid_image_url", param=param)
    _check_picture(param, ref)
    return ref


def _data_url(param: str, url: str, max_bytes: int) -> str:
    """A data URL checked: base64 that decodes to at most max_bytes bytes. Returns it without whitespace in its
    base64 (some clients wrap lines)."""
    head, sep, body = url.partition(",")
    if not sep or not head.lower().endswith(";base64"):
        raise ApiError(400, f"{param}: a data URL must hold base64: data:image/png;base64,<data>",
                       code="invalid_image", param=param)
    body = "".join(body.split())
    if len(body) // 4 * 3 > max_bytes + 2:  # refused before decoding
        raise _too_large(param, len(body) // 4 * 3, max_bytes)
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{param}: the data URL's base64 does not decode ({e})", code="invalid_image",
                       param=param) from None
    if len(raw) > max_bytes:
        raise _too_large(param, len(raw), max_bytes)
    return f"{head},{body}"


def _fetch(param: str, url: str, max_bytes: int) -> tuple[bytes, str]:
    """(the picture's bytes, its content type) from an http(s) URL, within FETCH_TIMEOUT_S and max_bytes."""
    import http.client
    import urllib.error
    import urllib.request

    start, shown = time.monotonic(), url if len(url) <= 200 else url[:200] + "..."
    request = urllib.request.Request(url, headers={"User-Agent": "tunesmith", "Accept": "image/*"})
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as resp:
            length = resp.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise _too_large(param, int(length), max_bytes)
            chunks, size = [], 0
            while size <= max_bytes:
                chunk = resp.read(_CHUNK)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if time.monotonic() - start > FETCH_TIMEOUT_S:
                    raise TimeoutError(f"the download took over {FETCH_TIMEOUT_S:g} s")
            kind = resp.headers.get_content_type()
    except ApiError:
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        why = getattr(e, "reason", None) or e
        raise ApiError(400, f"{param}: could not fetch {shown} ({type(e).__name__}: {why}); send the picture "
                            f"itself as a data URL (data:image/png;base64,...)", code="invalid_image_url",
                       param=param) from None
    if size > max_bytes:
        raise _too_large(param, size, max_bytes, fetched=True)
    return b"".join(chunks), kind if kind.startswith("image/") else "image"


def _check_picture(param: str, ref: str) -> None:
    """The picture's header reads as an image of at most PIL's MAX_IMAGE_PIXELS pixels (nothing is decoded)."""
    from PIL import Image

    from tunesmith.data.images import image_size

    try:
        width, height = image_size(ref)
    except Exception as e:  # noqa: BLE001 - ImageError, and PIL's own (DecompressionBombError, UnidentifiedImageError)
        if "decompression bomb" in str(e).lower():
            raise ApiError(400, f"{param}: the picture is too large to decode ({e})", code="image_too_large",
                           param=param) from None
        raise ApiError(400, f"{param}: not a picture this server can read ({type(e).__name__}: "
                            f"{str(e)[:200]})", code="invalid_image", param=param) from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise ApiError(400, f"{param}: the picture is {width}x{height} pixels, over the {limit:,} this server "
                            f"decodes; send a smaller one (it is resized to --max_pixels anyway)",
                       code="image_too_large", param=param)


def _too_large(param: str, size: int, max_bytes: int, fetched: bool = False) -> ApiError:
    told = f"over {max_bytes}" if fetched else str(size)
    return ApiError(400, f"{param}: the picture is {told} bytes; this server takes pictures of at most {max_bytes} "
                         f"bytes (--max_request_bytes)", code="image_too_large", param=param)
