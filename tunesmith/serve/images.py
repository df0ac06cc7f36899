"""The pictures of `tunesmith deploy`'s requests: the URLs of OpenAI `image_url` parts made into picture references
the engine reads (`tunesmith.inference.chat.ChatEngine.prompt`), each checked before any pixel is decoded.

- `data:image/...;base64,...` URLs (the scheme in any case: `DATA:` too): the base64 must decode, to at most
  `max_bytes` bytes (the server's picture limit, --max_request_bytes unless create_app is told otherwise).
- http(s) URLs (any case): fetched within FETCH_TIMEOUT_S for all of a request's pictures together (a deadline
  checked between reads, and each socket wait no longer than the time left, so a server that trickles bytes is cut
  off on time) and the same byte limit, then passed on as a data URL. Where the server has no network, or the
  address does not answer, the request gets a 400 naming the URL; the server fetches what clients name, so keep it
  off networks whose addresses clients must not reach (as with vLLM's and ms-swift's servers).
- Anything else (a path, file://) is refused: the server never reads its own files for a request. What reaches the
  engine is always a `data:` URL this module wrote.

Each picture's header must read as an image (PIL, from the bytes in hand) of at most PIL's `Image.MAX_IMAGE_PIXELS`
pixels (its decompression-bomb limit, ~89 megapixels), so that a small file that would decode to gigabytes is
refused before it is decoded. Errors are ApiError 400s in OpenAI's shape naming the part (param
messages[i].content[k]) and the URL as given, shortened (`shown`).

Threads: downloads run on FETCH_WORKERS threads of their own (`_fetch_pool`), never on the threads that decode
pictures and render prompts (starlette's pool, which text requests use too), and each request awaits them on the
event loop with its deadline: clients that name slow addresses hold at most FETCH_WORKERS fetch threads, each for
at most FETCH_TIMEOUT_S, and never delay a request whose pictures are data URLs (or that has none). A fetch that
waits for a free fetch thread past its request's deadline is dropped with the same 400. base64 and header checks
run on starlette's pool (they are short: the bytes are capped).
What must not live here: rendering and the vision tower's pixel inputs (`tunesmith.inference.chat`), reading the
pictures of datasets (`tunesmith.data.images`). No torch import.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import threading
import time
from typing import Optional

from tunesmith.data.images import url_scheme as scheme
from tunesmith.serve.protocol import ApiError

FETCH_TIMEOUT_S = 10.0   # all the http(s) downloads of one request, seconds
FETCH_WORKERS = 32       # downloads in flight at once, all requests together (`_fetch_pool`)
_GRACE_S = 0.25          # the event loop's deadline trails the fetch thread's, so that the thread's reason is told
_CHUNK = 1 << 16
_FORMATS = "a PNG, JPEG, WebP, GIF or BMP picture"
_pool = None
_pool_lock = threading.Lock()


def shown(url: str) -> str:
    """The URL as given, for messages: a data URL as its head and length, anything else cut at 100 characters."""
    url = url.strip()
    if scheme(url) == "data":
        return f"'{url.split(',', 1)[0][:60]},...' ({len(url)} characters)"
    return repr(url if len(url) <= 100 else url[:100] + "...")


async def resolve_images(urls: list[tuple[str, str]], max_bytes: int) -> list[str]:
    """[(param, url)] (protocol.image_urls) -> the pictures as `data:` URLs the engine reads (an http(s) picture
    fetched and encoded as one), in order. max_bytes: the most decoded bytes one picture may have. All the
    request's downloads run at once and share one deadline, FETCH_TIMEOUT_S from now.

    Raises ApiError 400 (the first failing picture in order): code invalid_image_url (a scheme other than
    data/http/https, a fetch that fails or times out), image_too_large (over max_bytes or PIL's pixel limit),
    invalid_image (base64 that does not decode, bytes that are not a picture)."""
    deadline = time.monotonic() + FETCH_TIMEOUT_S
    done = await asyncio.gather(*(_resolve(param, url, max_bytes, deadline) for param, url in urls),
                                return_exceptions=True)
    for result in done:
        if isinstance(result, BaseException):
            raise result
    return list(done)


async def _resolve(param: str, url: str, max_bytes: int, deadline: float) -> str:
    from starlette.concurrency import run_in_threadpool

    kind, answered = scheme(url), None
    if kind == "data":
        raw = await run_in_threadpool(_data_url, param, url, max_bytes)
    elif kind in ("http", "https"):
        raw, answered = await _download(param, url, max_bytes, deadline)
    else:
        what = f"a {kind}: URL" if kind else "a path, or other text that is no URL"
        raise ApiError(400, f"{param}: image_url must be a data: URL or an http(s) URL (data:image/png;base64,... "
                            f"or https://...), not {what} ({shown(url)}); this server never reads its own files",
                       code="invalid_image_url", param=param)
    mime = await run_in_threadpool(_check_picture, param, url, raw, answered)
    return f"data:{mime};base64," + base64.b64encode(raw).decode("ascii")


def _data_url(param: str, url: str, max_bytes: int) -> bytes:
    """The bytes of a data URL: base64 that decodes to at most max_bytes bytes (whitespace in it is dropped: some
    clients wrap lines)."""
    head, sep, body = url.strip().partition(",")
    if not sep or not head.lower().endswith(";base64"):
        raise ApiError(400, f"{param}: a data URL must hold base64: data:image/png;base64,<data> (got "
                            f"{shown(url)})", code="invalid_image", param=param)
    body = "".join(body.split())
    if len(body) // 4 * 3 > max_bytes + 2:  # refused before decoding
        raise _too_large(param, url, len(body) // 4 * 3, max_bytes)
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{param}: the data URL's base64 does not decode ({e}); encode the whole file, e.g. "
                            f"`base64 -w0 picture.png`", code="invalid_image", param=param) from None
    if len(raw) > max_bytes:
        raise _too_large(param, url, len(raw), max_bytes)
    return raw


def _fetch_pool():
    """The threads downloads run on (FETCH_WORKERS), apart from starlette's: see the module docstring."""
    global _pool
    with _pool_lock:
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor
            _pool = ThreadPoolExecutor(FETCH_WORKERS, thread_name_prefix="tunesmith-fetch")
        return _pool


async def _download(param: str, url: str, max_bytes: int, deadline: float) -> tuple[bytes, str]:
    """_fetch on a fetch thread, awaited until the deadline (the request is answered then even when the thread is
    still stuck, e.g. resolving the host name, or never got a thread)."""
    job = asyncio.get_running_loop().run_in_executor(_fetch_pool(), _fetch, param, url, max_bytes, deadline)
    try:
        return await asyncio.wait_for(job, max(0.0, deadline - time.monotonic()) + _GRACE_S)
    except asyncio.TimeoutError:
        raise _fetch_error(param, url, f"the download did not finish within {FETCH_TIMEOUT_S:g} s") from None


def _fetch(param: str, url: str, max_bytes: int, deadline: float) -> tuple[bytes, str]:
    """(the bytes, the content type the server named) of an http(s) URL, by `deadline` (time.monotonic()) and
    within max_bytes: the deadline is checked between reads and bounds every socket wait, so a server sending one
    byte at a time is cut off on time."""
    import http.client
    import urllib.error
    import urllib.request

    def left() -> float:
        rest = deadline - time.monotonic()
        if rest <= 0:
            raise TimeoutError(f"the download did not finish within {FETCH_TIMEOUT_S:g} s")
        return rest

    request = urllib.request.Request(url.strip(), headers={"User-Agent": "tunesmith", "Accept": "image/*"})
    opener = urllib.request.build_opener(_redirects())
    try:
        with opener.open(request, timeout=left()) as resp:
            length = resp.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise _too_large(param, url, int(length), max_bytes)
            sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
            chunks, size = [], 0
            while size <= max_bytes:
                rest = left()
                if sock is not None:
                    sock.settimeout(rest)
                chunk = resp.read1(_CHUNK)  # at most one socket read: the deadline is checked after each
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            answered = resp.headers.get_content_type()
    except ApiError:
        raise
    except TimeoutError:  # ours, or a socket wait that ran out of the time left (socket.timeout)
        raise _fetch_error(param, url, f"the download did not finish within {FETCH_TIMEOUT_S:g} s") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        why = getattr(e, "reason", None) or e
        raise _fetch_error(param, url, f"{type(e).__name__}: {why}") from None
    if size > max_bytes:
        raise _too_large(param, url, size, max_bytes, fetched=True)
    return b"".join(chunks), answered


def _redirects():
    """A redirect handler that follows redirects to http(s) addresses only (urllib's own would follow one to
    ftp:)."""
    import urllib.error
    import urllib.request

    class HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            if scheme(newurl) not in ("http", "https"):
                raise urllib.error.HTTPError(newurl, code, f"a redirect to {shown(newurl)} (not http(s)) is refused",
                                             headers, fp)
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return HttpOnlyRedirects


def _fetch_error(param: str, url: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: could not fetch {shown(url)} ({why}); send the picture itself as a data URL "
                         f"(data:image/png;base64,...)", code="invalid_image_url", param=param)


def _check_picture(param: str, url: str, raw: bytes, answered: Optional[str] = None) -> str:
    """The picture's header, read from its bytes (never a file), is an image of at most PIL's MAX_IMAGE_PIXELS
    pixels (nothing is decoded). answered: the content type an http(s) server named. Returns its media type
    (image/png...)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as im:
            (width, height), fmt = im.size, im.format
    except Image.DecompressionBombError as e:
        raise ApiError(400, f"{param}: the picture {shown(url)} is too large to decode ({e}); send a smaller one",
                       code="image_too_large", param=param) from None
    except Exception as e:  # noqa: BLE001 - UnidentifiedImageError, and PIL's header errors (SyntaxError, OSError...)
        why = "not a picture (its format is not one PIL reads)" if isinstance(e, UnidentifiedImageError) else \
            f"not a readable picture ({' '.join(str(e).split())[:200] or type(e).__name__})"
        if answered and not answered.startswith("image/"):
            why += f"; the address answered {answered}, not an image"
        raise ApiError(400, f"{param}: {shown(url)} is {why}; send {_FORMATS}", code="invalid_image",
                       param=param) from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise ApiError(400, f"{param}: the picture {shown(url)} is {width}x{height} pixels, over the {limit:,} this "
                            f"server decodes; send a smaller one (it is resized to --max_pixels anyway)",
                       code="image_too_large", param=param)
    return Image.MIME.get(fmt or "", "image")


def _too_large(param: str, url: str, size: int, max_bytes: int, fetched: bool = False) -> ApiError:
    told = f"over {max_bytes}" if fetched else str(size)
    return ApiError(400, f"{param}: the picture {shown(url)} is {told} bytes; this server takes pictures of at most "
                         f"{max_bytes} bytes (--max_request_bytes); send a smaller one", code="image_too_large",
                    param=param)
