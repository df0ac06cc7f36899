"""Images in dataset rows: reading every form the peers write them in into one canonical form, checking them, and
opening them for the encoder.

Canonical form (what `tunesmith.data.formats.normalise_row` puts in a record): each message's `content` is a string
with ms-swift's literal `<image>` tag (IMAGE_TAG) wherever a picture goes, and `record["images"]` lists one
reference per tag, in the order of the tags across the conversation's messages (every message's content, the system
message's included). A row with fewer tags than pictures gets the missing tags at the start of its first user
message (ms-swift's and TRL's templates do the same); more tags than pictures is a bad row. A reference is a
string, one of:

- a local path, kept as given when it exists from the current directory (relative paths are resolved from there, as
  ms-swift does); else, when it exists under $ROOT_IMAGE_DIR (ms-swift's variable) or next to the dataset file, that
  file's absolute path; `~` is expanded;
- `data:image/<format>;base64,<data>`, kept as is;
- `http(s)://...`, kept as is: not fetched while rows are read (`open_image` fetches it).

Inputs read (`to_reference`): those strings, `file://` URLs (turned into the path), raw base64 longer than 200
characters (ms-swift reads such strings as base64; turned into a data URL), Hugging Face datasets' Image feature
dicts `{"bytes": ..., "path": ...}` (the bytes win, as a data URL of their real format; `path` alone is a path),
`{"url": ...}` objects, bytes and in-memory PIL images (a PNG data URL). Row-level readers (`read_images`,
`read_content`, `attach_images`) turn a bad picture into the row's DataError (source:line, field, fix).

Checks while rows are read are cheap: a file must exist and open as an image (PIL's `Image.open` + `verify()`; JPEG
files without their end marker, and formats `verify` does not check, are decoded at reduced size to find truncated
ones); decoded pixels are never kept. Videos and audio are not supported yet (`refuse_other_media`).

What must not live here: which columns hold the conversation (`tunesmith.data.layouts`), tokenisation and model
image processors (the encoder). No torch import; PIL is imported when an image is looked at.
"""
from __future__ import annotations

import base64
import binascii
import functools
import io
import os
import re
import sys
from typing import Any, Callable, Optional

from tunesmith.data.row import Row, as_text, short
from tunesmith.errors import TunesmithError

IMAGE_TAG = "<image>"
OTHER_MEDIA_TAGS = ("<video>", "<audio>")
IMAGE_COLUMNS = ("images", "image")  # ms-swift's alias image -> images; TRL's single `image` column
OTHER_MEDIA_COLUMNS = ("videos", "audios", "video", "audio")  # ms-swift's, refused (images only)
PARTS_KEY = "_image_parts"  # a message's image parts (ImageParts) while the row is read

_IMAGE_PART_TYPES = ("image", "image_url", "input_image")
_OTHER_PART_TYPES = ("video", "video_url", "audio", "audio_url", "input_audio")
_DATA_URL = re.compile(r"data:([^,]*?),", re.DOTALL | re.IGNORECASE)
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")
_FETCH_FIX = "download it and pass the local path (or a data: URL) instead."
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")


class ImageError(TunesmithError, ValueError):
    """A picture that cannot be used: missing file, bad data URL, a URL that could not be fetched, not an image,
    corrupt or truncated. `ref` is the reference as given, `reason` what is wrong, `fix` what to do; the message is
    one line."""

    def __init__(self, ref: Any, reason: str, fix: str = ""):
        self.ref, self.reason, self.fix = ref, reason, fix
        super().__init__(f"image {describe(ref)}: {reason}" + (f" Fix: {fix}" if fix else ""))


def url_scheme(ref: Any) -> str:
    """The scheme of a reference, in lower case ("data", "http", "https", "file"), or "" (a path, or not a string).
    URL schemes are case-insensitive (RFC 3986): `DATA:image/png;base64,...` is a data URL, never a file name.
    One letter before the colon is a Windows drive (C:\\pictures), not a scheme."""
    if not isinstance(ref, str):
        return ""
    m = _SCHEME.match(ref.strip())
    return m.group(1).lower() if m and len(m.group(1)) > 1 else ""


def describe(ref: Any) -> str:
    """A reference for messages: data URLs and long values cut short (their length said)."""
    if url_scheme(ref) == "data":
        head = ref.split(",", 1)[0]
        return f"'{head},...' ({len(ref)} characters)"
    if isinstance(ref, (bytes, bytearray)):
        return f"<{len(ref)} bytes>"
    return short(ref, 80)


class ImageParts(list):
    """A message's image parts while its row is read: (field, checked reference or None for a bare
    {"type": "image"}) pairs, in order. Equal when the references are: the same picture read from `chosen[0]` and
    from `rejected[0]` (a TRL implicit pair) is the same message."""

    def __eq__(self, other):
        return isinstance(other, list) and [p[1] for p in self] == [p[1] for p in other]

    def __ne__(self, other):
        return not self == other

    __hash__ = None


# ---- opening pictures (the encoder's side) ----

def open_image(ref: str, timeout: float = 10.0):
    """The picture a canonical reference names, decoded, converted to RGB (alpha dropped, palettes expanded) and
    fully loaded (no file left open). EXIF orientation is not applied (as ms-swift, so the size is `image_size`'s).

    ref: a path, file:// URL, data URL or http(s) URL (fetched with urllib, `timeout` seconds).
    Returns a PIL.Image.Image of mode RGB.
    Raises ImageError: the file is missing, the data URL is not base64 image data, the URL could not be fetched,
    the data is not an image, or it is corrupt/truncated."""
    from PIL import Image

    try:
        with Image.open(_source(ref, timeout)) as im:
            im.load()
            return im.convert("RGB")
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise _decode_error(ref, e) from None


def image_size(ref: str, timeout: float = 10.0) -> tuple[int, int]:
    """(width, height) in pixels of the picture `ref` names, from its header only (no pixels decoded): what the
    encoder counts image tokens from before training. Raises ImageError as open_image."""
    from PIL import Image

    try:
        with Image.open(_source(ref, timeout)) as im:
            return im.size
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _decode_error(ref, e) from None


def _source(ref: str, timeout: float):
    """What PIL opens for `ref`: a file path, or the bytes of a data URL or of a fetched http(s) URL."""
    if not isinstance(ref, str) or not ref.strip():
        raise ImageError(ref, "an empty reference, or not a string.", "give a path, a data: URL or an http(s) URL.")
    ref = ref.strip()
    kind = url_scheme(ref)
    if kind in ("http", "https"):
        return io.BytesIO(_fetch(ref, timeout))
    if kind == "data":
        return io.BytesIO(data_url_bytes(ref))
    path = os.path.expanduser(file_url_path(ref) if kind == "file" else ref)
    if not os.path.isfile(path):
        raise _missing(ref, path)
    return path


def _fetch(url: str, timeout: float) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # http(s) only (checked by the caller)
            return resp.read()
    except Exception as e:  # noqa: BLE001 - URLError, HTTPError, timeouts, connection resets
        raise ImageError(url, f"the address could not be fetched ({_one_line(e)}).", _FETCH_FIX) from None


def _missing(ref: str, path: str) -> ImageError:
    what = "is a folder, not an image file" if os.path.isdir(path) else "does not exist"
    return ImageError(ref, f"the file {what} (looked for {os.path.abspath(path)}; relative paths are resolved from "
                      f"the current directory, {os.getcwd()}).", "correct the path, or run from the folder the "
                      "paths are relative to (or set ROOT_IMAGE_DIR to it).")


def _decode_error(ref: Any, e: Exception) -> ImageError:
    from PIL import Image, UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return ImageError(ref, "not an image (PIL cannot identify its format).",
                          "give a PNG, JPEG, WebP, GIF or BMP picture, or drop it.")
    if isinstance(e, OSError) and e.errno is not None:  # the file system's error, not the decoder's
        return ImageError(ref, f"the file cannot be read ({e.strerror or e}).",
                          "check the file and its permissions, or drop it.")
    if isinstance(e, Image.DecompressionBombError):
        return ImageError(ref, f"too large to open safely ({_one_line(e)}).", "downscale the picture.")
    return ImageError(ref, f"corrupt or truncated ({_one_line(e)}).", "replace the file with a complete copy, "
                      "or drop it.")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def file_url_path(url: str) -> str:
    """The local path of a `file:` URL (`file:///abs/x.png`, `file://localhost/abs/x.png`, percent-escapes
    decoded)."""
    from urllib.parse import unquote, urlparse

    parts = urlparse(url)
    if parts.netloc not in ("", "localhost"):  # file://relative/x.png: host-less authors mean the path
        return unquote(parts.netloc + parts.path)
    return unquote(parts.path)


def data_url_bytes(url: str) -> bytes:
    """The decoded bytes of a `data:<media type>;base64,<data>` URL. Raises ImageError when it is not base64 or
    the data does not decode."""
    m = _DATA_URL.match(url)
    if m is None:
        raise ImageError(url, "a data: URL without a comma before its data.",
                         "write data:image/png;base64,<the base64 of the file>.")
    if "base64" not in m.group(1).lower().split(";"):
        raise ImageError(url, f"a data: URL that is not base64-encoded (data:{m.group(1)},...).",
                         "write data:image/png;base64,<the base64 of the file>.")
    return _b64decode(url, url[m.end():])


def _b64decode(ref: Any, text: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(ref, f"not valid base64 data ({_one_line(e)}).",
                         "encode the file with base64 (e.g. `base64 -w0 picture.png`).") from None


# ---- references while rows are read ----

def to_reference(value: Any) -> str:
    """One picture in any input form (see the module docstring) as a reference string: paths and URLs as given
    (stripped; `file:` URLs as their path), bytes, Image feature dicts and PIL images as data URLs. Nothing is
    looked up here except the bytes' format. Raises ImageError: empty, an unknown form, bytes that are no image."""
    if isinstance(value, str):
        ref = value.strip()
        if not ref:
            raise ImageError(value, "an empty reference.", "give the picture's path or URL, or drop the entry.")
        if url_scheme(ref) == "file":
            return file_url_path(ref)
        if len(ref) >= 16 and url_scheme(ref) not in ("data", "http", "https") and _BASE64.fullmatch(ref) \
                and not os.path.exists(ref):
            try:  # ms-swift reads strings that are not files as base64 (any length whose bytes are a picture)
                return bytes_to_data_url(_b64decode(value, ref), value)
            except ImageError:
                return ref  # not a base64 picture: a path, reported as missing when checked
        return ref
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes_to_data_url(bytes(value), value)
    if isinstance(value, dict):
        return _dict_reference(value)
    if _is_picture(value):  # a PIL image (the other picture types are handled above)
        return pil_to_data_url(value)
    if value is None:
        raise ImageError(value, "null, not a picture.", "give the picture's path or URL, or drop the entry.")
    raise ImageError(value, f"a {type(value).__name__}, not a picture reference.",
                     "give a path, a URL, a data: URL, or {\"bytes\": ..., \"path\": ...}.")


def _dict_reference(value: dict) -> str:
    """An Image feature dict {"bytes", "path"} (bytes win) or a {"url"} object as a reference."""
    data = value.get("bytes")
    if data is not None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ImageError(value, f"its \"bytes\" are a {type(data).__name__}, not bytes.",
                             "give the file's bytes, or its \"path\".")
        return bytes_to_data_url(bytes(data), value)
    for key in ("path", "url", "image_url"):
        if isinstance(value.get(key), (str, dict)) and value[key]:
            return to_reference(value[key])
    raise ImageError(value, "an object without \"bytes\", \"path\" or \"url\".",
                     "give {\"bytes\": ..., \"path\": ...} (Hugging Face's Image feature), or the path as a string.")


def bytes_to_data_url(data: bytes, ref: Any = None) -> str:
    """`data:image/<format>;base64,...` for an encoded picture, its format sniffed by PIL. Raises ImageError when
    the bytes are not an image, or are corrupt."""
    fmt = check_bytes(data, ref if ref is not None else data)
    from PIL import Image

    mime = Image.MIME.get(fmt) or f"image/{fmt.lower()}"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def pil_to_data_url(image) -> str:
    """A PIL image (an in-memory Hugging Face dataset's decoded Image feature) as a lossless PNG data URL; modes PNG
    cannot hold are converted to RGB (RGBA with transparency)."""
    buf = io.BytesIO()
    try:
        image.save(buf, "PNG")
    except (OSError, ValueError, KeyError):
        buf = io.BytesIO()
        image.convert("RGBA" if "A" in image.getbands() else "RGB").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def check_bytes(data: bytes, ref: Any = None) -> str:
    """The format (PIL's name: PNG, JPEG, ...) of an encoded picture, after the cheap checks (see the module
    docstring). Raises ImageError: not an image, corrupt or truncated."""
    return _verified(lambda: io.BytesIO(data), data[-16:], ref if ref is not None else data)


def check_reference(ref: str, base_dir: Optional[str] = None) -> str:
    """The canonical reference for `ref` (a to_reference string) after the cheap checks: http(s) URLs as they
    are (not fetched); data URLs as they are, once their data reads as an image; local paths as given when they
    exist from the current directory, else their absolute path under $ROOT_IMAGE_DIR or `base_dir` (the dataset
    file's folder) where they exist there. Raises ImageError: a missing file, a bad data URL, not an image,
    corrupt or truncated."""
    if url_scheme(ref) in ("http", "https"):
        return ref
    if url_scheme(ref) == "data":
        check_bytes(data_url_bytes(ref), ref)
        return ref
    path = locate(ref, base_dir)
    try:
        st = os.stat(path)
        _check_file(os.path.abspath(path), st.st_size, st.st_mtime_ns, ref)
    except OSError as e:  # unreadable: permissions, an I/O error
        raise _decode_error(ref, e) from None
    return path


def locate(ref: str, base_dir: Optional[str] = None) -> str:
    """Where a local reference is: as given (`~` expanded) when it is a file from the current directory, else the
    absolute path under $ROOT_IMAGE_DIR or `base_dir`. Raises ImageError naming the path tried."""
    path = os.path.expanduser(ref)
    if os.path.isfile(path) or os.path.isabs(path):
        if not os.path.isfile(path):
            raise _missing(ref, path)
        return path
    for root in (os.environ.get("ROOT_IMAGE_DIR"), base_dir):
        if root and os.path.isfile(os.path.join(root, path)):
            return os.path.abspath(os.path.join(root, path))
    raise _missing(ref, path)


@functools.lru_cache(maxsize=1 << 16)
def _check_file(path: str, size: int, mtime_ns: int, ref: str) -> str:
    """check_bytes for a file, remembered per (path, size, modification time): a picture used by many rows is
    checked once."""
    with open(path, "rb") as fh:
        fh.seek(max(size - 16, 0))
        tail = fh.read()
    return _verified(lambda: open(path, "rb"), tail, ref)


def _refuse_huge(im, ref: Any) -> None:
    """ImageError for a picture over PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS, about 89 megapixels):
    decoding it would take gigabytes before the model's resize brings it down to --max_pixels."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit and im.width * im.height > limit:
        raise ImageError(ref, f"{im.width}x{im.height} pixels ({im.width * im.height / 1e6:.0f} megapixels), over the "
                         f"{limit / 1e6:.0f} megapixels a picture may have (decoding it would take gigabytes).",
                         "downscale it: the model resizes every picture to at most --max_pixels anyway.")


def _verified(opener: Callable[[], Any], tail: bytes, ref: Any) -> str:
    """The format of the picture `opener()` reads, after Image.open + verify(); a JPEG without its end marker
    (`tail`: the last bytes) and formats verify() does not check are decoded too (a JPEG at 1/8 size)."""
    import warnings

    from PIL import Image

    try:
        with opener() as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, in one message
            im = Image.open(fh)
            fmt = im.format or "PNG"
            _refuse_huge(im, ref)
            im.verify()  # PNG: every chunk and its checksum, to the end of the file
        if fmt == "PNG" or (fmt in ("JPEG", "MPO") and tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")):
            return fmt
        with opener() as fh, Image.open(fh) as im:
            im.draft("RGB", (max(im.width // 8, 1), max(im.height // 8, 1)))  # JPEG only; others load whole
            im.load()
        return fmt
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise _decode_error(ref, e) from None


# ---- rows ----

def row_folder(r: Row) -> Optional[str]:
    """The folder of the file the row came from (relative image paths not found from the current directory are
    looked up there), or None for hub data."""
    return os.path.dirname(os.path.abspath(r.source)) if os.path.isfile(r.source) else None


def reference(r: Row, field: str, value: Any) -> str:
    """One picture of the row (any input form) as its checked canonical reference; DataError naming `field`."""
    try:
        return check_reference(to_reference(value), row_folder(r))
    except ImageError as e:
        raise r.err(field, f"{describe(e.ref)}: {e.reason}", e.fix) from None


def read_images(r: Row, key: str, value: Any) -> list[str]:
    """An images column's value (a list, one picture, or a list written as a JSON string: CSV cells) as checked
    references; [] when null or empty. Raises DataError naming `key[i]` for a bad picture, `key` for a value that
    is not a picture or a list of them."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, str) and value.strip().startswith("[") and value.strip().endswith("]"):
        import json

        try:
            value = json.loads(value)
        except ValueError:
            raise r.err(key, "is a string that looks like a list but is not JSON.",
                        "write the list as JSON: [\"a.png\", \"b.png\"].") from None
    if not isinstance(value, (list, tuple)):
        if not _is_picture(value):
            raise r.err(key, f"expected a picture or a list of pictures, got {type(value).__name__} "
                        f"({short(value)}).", "write \"images\": [\"path/to/picture.png\", ...] (paths, URLs, data: "
                        "URLs or {\"bytes\", \"path\"} objects).")
        return [reference(r, key, value)]
    out = []
    for i, v in enumerate(value):
        if not _is_picture(v):
            raise r.err(f"{key}[{i}]", "is null." if v is None else f"expected a picture (a path, a URL or "
                        f"{{\"bytes\", \"path\"}}), got {type(v).__name__} ({short(v)}).",
                        "give one reference per picture, or drop the entry.")
        out.append(reference(r, f"{key}[{i}]", v))
    return out


def _is_picture(value: Any) -> bool:
    """Whether a value has a picture's type (a reference string, an Image feature dict, bytes, a PIL image)."""
    if isinstance(value, (str, dict, bytes, bytearray, memoryview)):
        return True
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(value, pil.Image)


def has_media_parts(value: Any) -> bool:
    """Whether a message content is a list of typed parts (OpenAI/TRL/Hugging Face: {"type": "text"|"image"|...})
    with at least one image, video or audio part."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(p, dict) and isinstance(p.get("type"), str) for p in value) and any(
        p["type"].lower() in _IMAGE_PART_TYPES + _OTHER_PART_TYPES for p in value)


def read_content(r: Row, field: str, value: Any) -> tuple[str, ImageParts]:
    """A message content as (text, image parts): a string as is; typed parts joined, each image part an IMAGE_TAG
    where it stood, with (its field, its checked reference, or None for TRL's bare {"type": "image"} whose picture
    is in the row's images column). Anything else goes through as_text (its errors). Raises DataError: a part of
    an unknown type, video/audio parts, a text part that is not text, a bad picture."""
    if not has_media_parts(value):
        return as_text(r, field, value), ImageParts()  # text parts: as_text joins them
    text, parts = [], ImageParts()
    for j, p in enumerate(value):
        f, kind = f"{field}[{j}]", p["type"].lower()
        if kind == "text":
            t = p.get("text")
            if t is not None and not isinstance(t, str):
                raise r.err(f + ".text", f"expected a string, got {type(t).__name__} ({short(t)}).",
                            "write the text as a JSON string.")
            text.append(t or "")
        elif kind in _IMAGE_PART_TYPES:
            key, raw = _part_reference(r, f, p)
            parts.append((key, None if raw is None else reference(r, key, raw)))
            text.append(IMAGE_TAG)
        elif kind in _OTHER_PART_TYPES:
            raise r.err(f + ".type", f"is {p['type']!r}: videos and audio are not supported yet, only images are.",
                        "drop the part (or the row), or train this model with ms-swift.")
        else:
            raise r.err(f + ".type", f"unknown content part type {short(p['type'])}.",
                        "use {\"type\": \"text\", \"text\": ...} and {\"type\": \"image\"} / {\"type\": \"image_url\", "
                        "\"image_url\": {\"url\": ...}} parts.")
    return "".join(text), parts


def _part_reference(r: Row, f: str, p: dict) -> tuple[str, Any]:
    """(field, raw picture) of an image part: OpenAI's image_url (an object with url, or the url itself), TRL's
    and Hugging Face's image/path/url/base64 keys; raw None for a bare {"type": "image"}."""
    if p["type"].lower() != "image":  # image_url, input_image
        v = p.get("image_url")
        if isinstance(v, dict):
            f, v = f + ".image_url.url", v.get("url")
        else:
            f += ".image_url"
        if v is None or (isinstance(v, str) and not v.strip()):
            raise r.err(f, "is missing or empty: an image_url part needs the picture's address.",
                        "write {\"type\": \"image_url\", \"image_url\": {\"url\": \"a path, data: URL or http(s) "
                        "URL\"}}.")
        return f, v
    for key in ("image", "path", "url", "image_url", "base64"):
        v = p.get(key)
        if v is not None and not (isinstance(v, str) and not v.strip()):
            if isinstance(v, dict) and key == "image_url":
                return f"{f}.image_url.url", v.get("url")
            if key == "base64" and isinstance(v, str) and url_scheme(v) != "data":
                try:
                    v = _b64decode(v, v)  # bytes: made a data URL of their real format
                except ImageError as e:
                    raise r.err(f"{f}.base64", e.reason, e.fix) from None
            return f"{f}.{key}", v
    return f, None


def refuse_other_media(r: Row) -> None:
    """A row with videos or audio (ms-swift's videos/audios columns) is refused: only images are supported yet, and
    the row would be trained without them."""
    for k in OTHER_MEDIA_COLUMNS:
        key, v = r.get(k)
        if v not in (None, [], "", {}):
            raise r.err(key, "holds videos or audio, which are not supported yet: only images are, and the row would "
                        "be trained without them.", f"drop the {key!r} column (and the <video>/<audio> tags) to train "
                        "on the rest, or train this model with ms-swift.")


def _image_column(r: Row, name: str = "images") -> tuple[Optional[str], list[str]]:
    """(column key, checked references) of the row's images column (`images`, else `image`; or `rejected_images`);
    (None, []) without one. Both `images` and `image` holding pictures is a bad row."""
    names = IMAGE_COLUMNS if name == "images" else (name,)
    found = [(r.keys[n], r.row[r.keys[n]]) for n in names if n in r.keys and r.row[r.keys[n]] not in (None, [], "")]
    if len(found) > 1:
        raise r.err(found[1][0], f"holds pictures, and so does {found[0][0]!r}: it is not clear which to use.",
                    "keep one of the two columns.")
    if not found:
        return None, []
    return found[0][0], read_images(r, *found[0])


def _strip_parts(messages: list[dict]) -> tuple[list[dict], list[tuple[str, Optional[str]]]]:
    """(messages without their image parts key, the parts in order)."""
    parts = [p for m in messages for p in m.get(PARTS_KEY, ())]
    return [{k: v for k, v in m.items() if k != PARTS_KEY} if PARTS_KEY in m else m for m in messages], parts


def tag_count(messages: list[dict], tag: str = IMAGE_TAG) -> int:
    """How many `tag`s the messages' contents hold (system message included)."""
    return sum(m.get("content", "").count(tag) for m in messages if isinstance(m.get("content"), str))


def _conversation_images(r: Row, field: str, what: str, messages: list[dict], column: Optional[str],
                         given: list[str], shared: str = "") -> tuple[list[dict], list[str]]:
    """(messages without their image parts, pictures) of one conversation: the pictures its image parts carry, or
    else those of `column` (`given`), one per <image> tag. Fewer tags than pictures: the missing tags are put at
    the start of the first user message (as ms-swift's and TRL's templates do). what: the conversation named in
    errors ("the conversation", "the rejected conversation"); shared: said after the column's name when the
    rejected conversation shares the chosen one's pictures."""
    messages, parts = _strip_parts(messages)
    carried = [ref for _, ref in parts if ref is not None]
    if carried:
        if given:
            raise r.err(column, f"gives {len(given)} picture(s), and the image parts of {what} ({field}) carry their "
                        f"own ({len(carried)}): it is not clear which to keep.", f"keep one: drop the {column!r} "
                        "column, or the references in the parts (leaving bare {\"type\": \"image\"} parts).")
        bare = next((f for f, ref in parts if ref is None), None)
        if bare is not None:
            raise r.err(bare, "is an image part without a picture, while other parts carry theirs.",
                        "give every image part its picture (image_url, image, path or url).")
    refs = carried or given
    tags = tag_count(messages)
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant" and IMAGE_TAG in (m.get("content") or "")]
    if refs and replies:
        raise r.err(f"{field}[{replies[0]}].content", f"an assistant reply holds an {IMAGE_TAG} tag: the model would "
                    "be trained to write a picture's markers, which it cannot draw.",
                    "put the pictures in user messages (the question), not in the replies.")
    if tags > len(refs):
        source = f"its image parts carry {len(refs)}" if carried else (
            f"{column!r}{shared} gives {len(refs)}" if column else "the row gives no pictures")
        raise r.err(column if column and not carried else field, f"{what} ({field}) has {tags} {IMAGE_TAG} tag(s), "
                    f"but {source}: each picture goes where its tag is, in order.",
                    "put one <image> tag in the text per picture (or drop the extra tags)"
                    + ("; add the pictures as \"images\": [\"path.png\", ...]." if not refs else "."))
    if tags < len(refs):
        k = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages = list(messages)
        messages[k] = {**messages[k], "content": IMAGE_TAG * (len(refs) - tags) + messages[k]["content"]}
    return messages, refs


def _refuse_tags(r: Row, field: str, conversations: list[list[dict]]) -> None:
    for conv in conversations:
        for tag in OTHER_MEDIA_TAGS:
            if tag_count(conv, tag):
                raise r.err(field, f"holds a {tag} tag: videos and audio are not supported yet, only images are.",
                            f"remove the {tag} tags (and the media columns), or train this model with ms-swift.")


def attach_images(r: Row, field: str, messages: list[dict],
                  rejected: Optional[list[dict]]) -> tuple[list[dict], Optional[list[dict]], dict]:
    """The row's pictures, matched to its conversations: (messages, rejected messages, media) with the messages'
    image parts key removed and one <image> tag per picture (missing tags put at the start of the first user
    message, as ms-swift and TRL do); media is {} for a row without pictures, else {"images": [...]} and, when the
    rejected conversation has pictures of its own (ms-swift's `rejected_images` column, or image parts that
    differ), "rejected_images". field: the messages' column, named in errors. Raises DataError: a bad picture,
    more tags than pictures (per conversation), pictures both in the parts and a column, <video>/<audio> tags."""
    conversations = [messages] + ([rejected] if rejected is not None else [])
    if not any(n in r.keys for n in (*IMAGE_COLUMNS, "rejected_images")) and not any(
            PARTS_KEY in m or "<" in m.get("content", "") for conv in conversations for m in conv):
        return messages, rejected, {}  # a text row (the common case, kept quick): no tags, no pictures
    _refuse_tags(r, field, conversations)
    column, given = _image_column(r)
    messages, images = _conversation_images(r, field, "the conversation" if rejected is None else
                                            "the chosen conversation", messages, column, given)
    media: dict[str, list[str]] = {"images": images} if images else {}
    if rejected is None:
        return messages, None, media
    rcolumn, rgiven = _image_column(r, "rejected_images")
    if rcolumn is not None:
        rejected, rimages = _conversation_images(r, "rejected", "the rejected conversation", rejected, rcolumn,
                                                 rgiven)
    else:
        rejected, rimages = _conversation_images(r, "rejected", "the rejected conversation", rejected, column, given,
                                                 " (shared with the chosen conversation; rejected_images gives the "
                                                 "rejected one its own)")
    if rcolumn is not None or rimages != images:
        media["rejected_images"] = rimages
    return messages, rejected, media
