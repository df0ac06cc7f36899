"""Rows with pictures: every form the peers write them in (ms-swift's `<image>` tags and images/image columns,
LLaMA-Factory's sharegpt/alpaca rows, OpenAI image_url parts, TRL/axolotl/Hugging Face image parts, Image feature
dicts, PIL images) load to one canonical record — contents as strings with `<image>` tags, "images" one reference
per tag — and every bad picture is a bad row naming file:line and field. Pictures are made here with PIL; nothing
is fetched from a network."""
import base64
import csv
import io
import json
import os

import pytest
from PIL import Image

from conftest import cli, write_jsonl
from tunesmith.data.formats import extra_columns, normalise_row
from tunesmith.data.images import (IMAGE_TAG, ImageError, check_bytes, image_size, open_image, pil_to_data_url,
                                   to_reference)
from tunesmith.data.load import load_datasets, rows_for
from tunesmith.errors import DataError


def _picture(path, size=(6, 4), fmt=None, color=(200, 30, 10)):
    """A tiny picture written at `path` (format from the suffix unless fmt); returns its path as a string."""
    Image.new("RGB", size, color).save(path, fmt)
    return str(path)


def _bytes(fmt="PNG", size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, fmt)
    return buf.getvalue()


def _data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _msgs(user, reply="a cat"):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def _load(tmp_path, rows, name="d.jsonl", **kw):
    return load_datasets([write_jsonl(tmp_path / name, rows)], **kw).records


@pytest.fixture
def pics(tmp_path, monkeypatch):
    """Two pictures in the current directory (tmp_path): a.png and b.jpg."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ROOT_IMAGE_DIR", raising=False)
    _picture(tmp_path / "a.png")
    _picture(tmp_path / "b.jpg")
    return tmp_path


# ---- every input form -> the canonical record ----

def test_ms_swift_and_llama_factory_text_forms_with_tags(pics):
    """messages, query/response, sharegpt conversations and alpaca rows with <image> tags and an images list (or
    one string, or the singular image column) give the same record; relative paths found from the current
    directory are kept as given."""
    want = {"messages": _msgs("<image>what is this?"), "images": ["a.png"]}
    rows = [
        {"messages": _msgs("<image>what is this?"), "images": ["a.png"]},
        {"messages": _msgs("<image>what is this?"), "images": "a.png"},
        {"messages": _msgs("<image>what is this?"), "image": "a.png"},
        {"query": "<image>what is this?", "response": "a cat", "images": ["a.png"]},
        {"conversations": [{"from": "human", "value": "<image>what is this?"}, {"from": "gpt", "value": "a cat"}],
         "images": ["a.png"]},
        {"instruction": "<image>what is this?", "input": "", "output": "a cat", "images": ["a.png"]},
    ]
    assert _load(pics, rows) == [want] * len(rows)
    two = {"messages": [{"role": "user", "content": "<image>and<image>?"}, {"role": "assistant", "content": "x"},
                        {"role": "user", "content": "again <image>"}, {"role": "assistant", "content": "y"}],
           "images": ["a.png", "b.jpg", str(pics / "a.png")]}
    assert _load(pics, [two], "two.jsonl") == [two]


def test_reference_forms(pics, tmp_path, monkeypatch):
    """file:// becomes the path; data URLs and http(s) URLs are kept as given; `~` is expanded; a relative path
    that is not found from the current directory is looked for under ROOT_IMAGE_DIR, then next to the dataset
    file, and kept as that absolute path."""
    data = _data_url(_bytes("JPEG"), "image/jpeg")
    refs = [f"file://{pics / 'a.png'}", data, "https://example.com/cat.png", "http://example.com/dog.jpg"]
    row = {"messages": _msgs(IMAGE_TAG * 4), "images": refs}
    assert _load(pics, [row])[0]["images"] == [str(pics / "a.png"), data, refs[2], refs[3]]
    monkeypatch.setenv("HOME", str(pics))
    assert _load(pics, [{"messages": _msgs("<image>"), "images": ["~/a.png"]}])[0]["images"] == [str(pics / "a.png")]
    folder = tmp_path / "set"
    (folder / "pics").mkdir(parents=True)
    _picture(folder / "pics" / "c.png")
    path = write_jsonl(folder / "rows.jsonl", [{"messages": _msgs("<image>"), "images": ["pics/c.png"]}])
    assert load_datasets([path]).records[0]["images"] == [str(folder / "pics" / "c.png")]
    root = tmp_path / "root"
    (root / "pics").mkdir(parents=True)
    _picture(root / "pics" / "c.png")
    monkeypatch.setenv("ROOT_IMAGE_DIR", str(root))  # ms-swift's variable comes before the dataset's folder
    assert load_datasets([path]).records[0]["images"] == [str(root / "pics" / "c.png")]


def test_openai_image_url_parts(pics):
    """image_url parts (an object with url, or the url as a string) become <image> tags where they stood, the text
    parts joined around them; the urls are the images, in order across the conversation."""
    data = _data_url(_bytes())
    row = {"messages": [
        {"role": "system", "content": "Describe pictures."},
        {"role": "user", "content": [{"type": "text", "text": "first "},
                                     {"type": "image_url", "image_url": {"url": "a.png", "detail": "low"}},
                                     {"type": "text", "text": " then "}, {"type": "image_url", "image_url": data}]},
        {"role": "assistant", "content": "two pictures"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/c.png"}},
                                     {"type": "text", "text": "and this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a third"}]}]}
    assert _load(pics, [row]) == [{"messages": [
        {"role": "system", "content": "Describe pictures."},
        {"role": "user", "content": "first <image> then <image>"},
        {"role": "assistant", "content": "two pictures"},
        {"role": "user", "content": "<image>and this?"},
        {"role": "assistant", "content": "a third"}], "images": ["a.png", data, "https://example.com/c.png"]}]


def test_trl_axolotl_and_hugging_face_image_parts(pics):
    """Bare {"type": "image"} parts take the row's images (or image) column in order (Arrow's padding keys are
    ignored); parts that carry their own picture (image, path, url, base64, an Image feature dict) give it."""
    want = {"messages": _msgs("<image>What is it?"), "images": ["a.png"]}
    bare = [{"type": "image", "text": None, "index": 0}, {"type": "text", "text": "What is it?", "index": None}]
    rows = [{"messages": [{"role": "user", "content": bare}, {"role": "assistant", "content": "a cat"}],
             "images": ["a.png"]},
            {"messages": [{"role": "user", "content": bare}, {"role": "assistant", "content": "a cat"}],
             "image": "a.png"}]
    for key in ("image", "path", "url"):
        rows.append({"messages": [{"role": "user", "content": [{"type": "image", key: "a.png"},
                                                               {"type": "text", "text": "What is it?"}]},
                                  {"role": "assistant", "content": "a cat"}]})
    assert _load(pics, rows) == [want] * len(rows)
    png = _bytes()
    row = {"messages": [{"role": "user", "content": [{"type": "image", "base64": base64.b64encode(png).decode()},
                                                     {"type": "image", "image": {"bytes": None, "path": "b.jpg"}},
                                                     {"type": "text", "text": "?"}]},
                        {"role": "assistant", "content": "two"}]}
    assert normalise_row(row) == {"messages": _msgs("<image><image>?", "two"), "images": [_data_url(png), "b.jpg"]}


def test_image_feature_dicts_bytes_and_pil_images(pics, tmp_path):
    """Hugging Face's Image feature as parquet stores it ({"bytes", "path"}): the bytes win, as a data URL of their
    real format; a dict with only a path is that path. In-memory PIL images (a hub dataset iterated) become PNG data
    URLs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    jpeg = _bytes("JPEG")
    rows = [{"messages": _msgs("<image><image>"),
             "images": [{"bytes": jpeg, "path": "ignored.png"}, {"bytes": None, "path": "a.png"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    rec = load_datasets([str(tmp_path / "d.parquet")]).records[0]
    assert rec == {"messages": _msgs("<image><image>"), "images": [_data_url(jpeg, "image/jpeg"), "a.png"]}
    pil = Image.new("RGB", (3, 2), (9, 9, 9))
    rec = normalise_row({"prompt": "<image>what?", "chosen": "grey", "rejected": "red", "image": pil})
    assert rec["images"] == [pil_to_data_url(pil)] and rec["images"][0].startswith("data:image/png;base64,")
    assert open_image(rec["images"][0]).getpixel((0, 0)) == (9, 9, 9)
    cmyk = Image.new("CMYK", (2, 2))  # a mode PNG cannot hold: converted
    assert open_image(to_reference(cmyk)).size == (2, 2)


def test_missing_tags_go_before_the_first_user_message(pics):
    """Fewer <image> tags than pictures (none at all: RLAIF-V's question/chosen/rejected/image rows): the missing
    tags go at the start of the first user message, after a system message, as ms-swift's and TRL's templates put
    them; each side of a pair gets them."""
    system = {"role": "system", "content": "Look closely."}
    rows = [{"messages": [system, *_msgs("what?")], "images": ["a.png"]},
            {"messages": [system, *_msgs("<image> and?")], "images": ["a.png", "b.jpg"]},
            {"question": "what?", "chosen": "a cat", "rejected": "a dog", "image": "a.png"},
            {"messages": _msgs("what?"), "images": ["a.png"], "rejected_images": ["a.png", "b.jpg"]}]
    assert _load(pics, rows) == [
        {"messages": [system, *_msgs("<image>what?")], "images": ["a.png"]},
        {"messages": [system, *_msgs("<image><image> and?")], "images": ["a.png", "b.jpg"]},
        {"messages": _msgs("<image>what?", "a cat"), "rejected_messages": _msgs("<image>what?", "a dog"),
         "images": ["a.png"]},
        {"messages": _msgs("<image>what?"), "rejected_messages": _msgs("<image><image>what?"), "images": ["a.png"],
         "rejected_images": ["a.png", "b.jpg"]}]


def test_csv_cells_hold_a_json_list(pics, tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["query", "response", "images"])
        w.writerow(["<image><image>?", "two", json.dumps(["a.png", "b.jpg"])])
        w.writerow(["<image>?", "one", "a.png"])
        w.writerow(["no picture", "none", ""])
    assert load_datasets([str(path)]).records == [
        {"messages": _msgs("<image><image>?", "two"), "images": ["a.png", "b.jpg"]},
        {"messages": _msgs("<image>?", "one"), "images": ["a.png"]},
        {"messages": _msgs("no picture", "none")}]


# ---- pairs, KTO, prompts ----

def test_preference_rows_share_or_own_their_pictures(pics):
    """A pair's rejected conversation shares the images unless the row gives rejected_images (or its parts carry
    other pictures); ms-swift's rejected_images alone makes the same conversation with other pictures a pair."""
    shared = {"messages": _msgs("<image>what?", "a cat"), "rejected_messages": _msgs("<image>what?", "a dog"),
              "images": ["a.png"]}
    rows = [{"prompt": "<image>what?", "chosen": "a cat", "rejected": "a dog", "images": ["a.png"]},
            {"messages": _msgs("<image>what?", "a cat"), "rejected_response": "a dog", "images": "a.png"},
            {"chosen": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]},
                        {"role": "assistant", "content": "a cat"}],
             "rejected": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]},
                          {"role": "assistant", "content": "a dog"}], "images": ["a.png"]},
            {"prompt": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}},
                                                     {"type": "text", "text": "what?"}]}],
             "chosen": [{"role": "assistant", "content": "a cat"}], "rejected": "a dog"}]
    assert _load(pics, rows) == [shared] * len(rows)
    own = {"messages": _msgs("<image>what?", "a cat"), "rejected_response": "a dog", "images": ["a.png"],
           "rejected_images": ["b.jpg"]}
    assert _load(pics, [own], "own.jsonl") == [{**shared, "rejected_images": ["b.jpg"]}]
    only = {"messages": _msgs("<image>what?", "a cat"), "images": ["a.png"], "rejected_images": ["b.jpg"]}
    assert _load(pics, [only], "only.jsonl") == [{"messages": only["messages"], "rejected_messages": only["messages"],
                                                  "images": ["a.png"], "rejected_images": ["b.jpg"]}]


def test_kto_prompt_and_infer_rows(pics, tmp_path):
    """KTO's labelled rows keep their images; a pair read as KTO rows gives each side its own pictures; prompt-only
    rows (GRPO, infer: need_reply False) carry images too, and the image columns are not extra columns."""
    kto = {"messages": _msgs("<image>what?"), "label": False, "images": ["a.png"]}
    assert _load(pics, [kto]) == [{"messages": kto["messages"], "label": False, "images": ["a.png"]}]
    pair = {"messages": _msgs("<image>what?", "a cat"), "rejected_response": "a dog", "images": ["a.png"],
            "rejected_images": ["b.jpg"]}
    loaded = load_datasets([write_jsonl(tmp_path / "p.jsonl", [pair])])
    assert rows_for(loaded, "kto").records == [
        {"messages": _msgs("<image>what?", "a cat"), "label": True, "images": ["a.png"]},
        {"messages": _msgs("<image>what?", "a dog"), "label": False, "images": ["b.jpg"]}]
    prompt = {"messages": [{"role": "user", "content": "<image>how many?"}], "images": ["a.png"], "solution": "2"}
    loaded = load_datasets([write_jsonl(tmp_path / "q.jsonl", [prompt])], need_reply=False, keep_columns=True)
    assert loaded.records == [{"messages": prompt["messages"], "images": ["a.png"], "columns": {"solution": "2"}}]
    assert extra_columns({"query": "<image>", "image": "a.png", "id": 3}) == {"id": 3}


def test_text_rows_are_unchanged(pics):
    """Without pictures a record has no images key (empty or null image columns included), exactly as before."""
    rows = [{"messages": _msgs("hi", "yo")}, {"messages": _msgs("hi", "yo"), "images": []},
            {"messages": _msgs("hi", "yo"), "images": None, "videos": []},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                          {"role": "assistant", "content": "yo"}]}]
    assert _load(pics, rows) == [{"messages": _msgs("hi", "yo")}] * 4
    tool = {"messages": [{"role": "user", "content": "sum"},
                         {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
                         {"role": "tool", "content": [{"type": "result", "value": 3}]},
                         {"role": "assistant", "content": "3"}],
            "tools": [{"type": "function", "function": {"name": "f"}}]}
    assert _load(pics, [tool], "t.jsonl")[0]["messages"][2]["content"] == '[{"type": "result", "value": 3}]'


# ---- bad rows ----

def _truncated(path, fmt):
    """A noisy picture whose file is cut at three quarters (its header intact)."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (64, 48), os.urandom(64 * 48 * 3)).save(buf, fmt)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 3 // 4])


def _bad_cases(tmp_path):
    """(name, row, field, message fragments) for rows that must be refused."""
    (tmp_path / "notes.png").write_text("not a picture")
    _truncated(tmp_path / "cut.png", "PNG")
    _truncated(tmp_path / "cut.jpg", "JPEG")
    (tmp_path / "dir.png").mkdir(exist_ok=True)
    return [
        ("more tags than pictures", {"messages": _msgs("<image><image>?"), "images": ["a.png"]}, "images",
         ["the conversation (messages) has 2 <image> tag(s), but 'images' gives 1"]),
        ("tags without pictures", {"messages": _msgs("<image>?")}, "messages",
         ["has 1 <image> tag(s), but the row gives no pictures", "\"images\": [\"path.png\""]),
        ("tag in a reply", {"prompt": "<image>?", "chosen": "x", "rejected": "<image> y", "images": ["a.png"]},
         "rejected[1].content", ["an assistant reply holds an <image> tag", "put the pictures in user messages"]),
        ("rejected_images count", {"messages": [{"role": "user", "content": "<image><image>?"},
                                                {"role": "assistant", "content": "x"}],
                                   "rejected_response": "y", "images": ["a.png", "a.png"],
                                   "rejected_images": ["b.jpg"]},
         "rejected_images",
         ["the rejected conversation (rejected) has 2 <image> tag(s), but 'rejected_images' gives 1"]),
        ("a number", {"messages": _msgs("<image>"), "images": 5}, "images",
         ["expected a picture or a list of pictures, got int (5)"]),
        ("a number in the list", {"messages": _msgs("<image>"), "images": [5]}, "images[0]",
         ["expected a picture", "got int"]),
        ("a nested list", {"messages": _msgs("<image>"), "images": [["a.png"]]}, "images[0]", ["got list"]),
        ("null", {"messages": _msgs("<image>"), "images": [None]}, "images[0]", ["is null"]),
        ("empty", {"messages": _msgs("<image>"), "images": [" "]}, "images[0]", ["an empty reference"]),
        ("dict", {"messages": _msgs("<image>"), "images": [{"name": "a.png"}]}, "images[0]",
         ["an object without \"bytes\", \"path\" or \"url\""]),
        ("not base64", {"messages": _msgs("<image>"), "images": ["data:image/png,abc"]}, "images[0]",
         ["a data: URL that is not base64-encoded"]),
        ("bad base64", {"messages": _msgs("<image>"), "images": ["data:image/png;base64,@@@"]}, "images[0]",
         ["not valid base64 data"]),
        ("data not an image", {"messages": _msgs("<image>"),
                               "images": [_data_url(b"hello there", "image/png")]}, "images[0]",
         ["'data:image/png;base64,...'", "not an image (PIL cannot identify its format)"]),
        ("missing file", {"messages": _msgs("<image>"), "images": ["nowhere/cat.png"]}, "images[0]",
         ["'nowhere/cat.png': the file does not exist (looked for " + str(tmp_path / "nowhere" / "cat.png"),
          "relative paths are resolved from the current directory"]),
        ("a folder", {"messages": _msgs("<image>"), "images": ["dir.png"]}, "images[0]",
         ["is a folder, not an image file"]),
        ("not an image file", {"messages": _msgs("<image>"), "images": ["notes.png"]}, "images[0]",
         ["'notes.png': not an image"]),
        ("truncated png", {"messages": _msgs("<image>"), "images": ["cut.png"]}, "images[0]",
         ["corrupt or truncated"]),
        ("truncated jpeg", {"messages": _msgs("<image>"), "images": ["cut.jpg"]}, "images[0]",
         ["corrupt or truncated"]),
        ("bytes not an image", {"messages": _msgs("<image>"), "images": [{"bytes": None, "path": "notes.png"}]},
         "images[0]", ["not an image"]),
        ("bad part picture", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "gone.png"}}]}, {"role": "assistant", "content": "x"}]},
         "messages[0].content[0].image_url.url", ["'gone.png': the file does not exist"]),
        ("part without url", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {}}]}, {"role": "assistant", "content": "x"}]},
         "messages[0].content[0].image_url.url", ["an image_url part needs the picture's address"]),
        ("parts and column", {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}]},
                                           {"role": "assistant", "content": "x"}], "images": ["b.jpg"]},
         "images", ["gives 1 picture(s), and the image parts of the conversation (messages) carry their own (1)",
                    "keep one"]),
        ("bare and carrying parts", {"messages": [{"role": "user", "content": [
            {"type": "image", "image": "a.png"}, {"type": "image"}]}, {"role": "assistant", "content": "x"}]},
         "messages[0].content[1]", ["an image part without a picture, while other parts carry theirs"]),
        ("image and images", {"messages": _msgs("<image>"), "images": ["a.png"], "image": "b.jpg"}, "image",
         ["holds pictures, and so does 'images'"]),
        ("video tag", {"messages": _msgs("<video>what happens?")}, "messages",
         ["holds a <video> tag: videos and audio are not supported yet, only images are"]),
        ("audio tag", {"query": "<audio>?", "response": "a bird"}, "messages", ["holds a <audio> tag"]),
        ("video column", {"messages": _msgs("<video>"), "videos": "v.mp4"}, "videos",
         ["holds videos or audio, which are not supported yet: only images are"]),
        ("audio part", {"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "..."}}]}, {"role": "assistant", "content": "x"}]},
         "messages[0].content[0].type", ["videos and audio are not supported yet, only images are"]),
        ("unknown part", {"messages": [{"role": "user", "content": [
            {"type": "image"}, {"type": "sticker"}]}, {"role": "assistant", "content": "x"}], "images": ["a.png"]},
         "messages[0].content[1].type", ["unknown content part type 'sticker'"]),
    ]


def test_bad_rows_name_file_line_and_field(pics, tmp_path):
    """Every bad picture row raises one DataError naming file:line, the field, the problem and a fix."""
    good = {"messages": _msgs("<image>fine"), "images": ["a.png"]}
    for name, row, field, fragments in _bad_cases(tmp_path):
        path = write_jsonl(tmp_path / "bad.jsonl", [good, row, good])
        with pytest.raises(DataError) as e:
            load_datasets([path])
        msg = str(e.value)
        assert msg.startswith(f"{path}:2: field '{field}': "), (name, msg)
        assert all(f in msg for f in fragments) and "Fix:" in msg and "\n" not in msg, (name, msg)


def test_strict_false_drops_and_counts_bad_picture_rows(pics, tmp_path, capsys):
    """--strict false: every bad row is dropped and counted (its reason kept), the good rows load; `data convert`
    writes the good rows with their pictures."""
    good = {"messages": _msgs("<image>fine"), "images": ["a.png"]}
    bad = [row for _, row, _, _ in _bad_cases(tmp_path)]
    path = write_jsonl(tmp_path / "mixed.jsonl", [good, *bad, good])
    loaded = load_datasets([path], strict=False)
    assert loaded.records == [good, good] and loaded.dropped == len(bad)
    assert loaded.reasons[0].startswith(f"{path}:2: field 'images'") and len(loaded.reasons) == 5
    rc, out, _ = cli(capsys, "data", "convert", "--dataset", path, "--strict", "false",
                     "--output", tmp_path / "canon.jsonl")
    assert rc == 0 and f"{len(bad)} bad rows dropped; first: {path}:2:" in out, out
    absolute = {**good, "images": [os.path.abspath("a.png")]}  # written to find the picture from any folder
    assert [json.loads(x) for x in (tmp_path / "canon.jsonl").read_text().splitlines()] == [absolute, absolute]
    rc, out, _ = cli(capsys, "data", "validate", "--dataset", path)
    assert rc == 1 and f"{len(bad)} problem(s)" in out, out


# ---- opening pictures ----

def test_open_image_and_image_size(pics, tmp_path):
    """PNG, JPEG, data URLs and file:// URLs open as fully loaded RGB pictures; image_size reads (width, height)
    from the header."""
    Image.new("RGBA", (7, 5), (10, 20, 30, 0)).save(tmp_path / "alpha.png")
    Image.new("P", (3, 9)).save(tmp_path / "palette.gif")
    for ref, size in [("a.png", (6, 4)), (str(pics / "b.jpg"), (6, 4)), ("alpha.png", (7, 5)),
                      ("palette.gif", (3, 9)), (f"file://{tmp_path / 'a.png'}", (6, 4)),
                      (_data_url(_bytes("JPEG", (11, 3)), "image/jpeg"), (11, 3))]:
        im = open_image(ref)
        assert (im.mode, im.size) == ("RGB", size) and image_size(ref) == size, ref
    assert open_image("alpha.png").getpixel((0, 0)) == (10, 20, 30)
    assert check_bytes(_bytes("JPEG")) == "JPEG"


def test_open_image_errors(pics, tmp_path):
    """Each failure is one ImageError (a ValueError) with a one-line message saying what to do."""
    (tmp_path / "notes.png").write_text("not a picture")
    _truncated(tmp_path / "cut.png", "PNG")
    _truncated(tmp_path / "cut.jpg", "JPEG")
    cases = [("missing.png", "the file does not exist (looked for " + str(tmp_path / "missing.png")),
             ("data:image/png,xyz", "not base64-encoded"),
             ("data:image/png;base64,!!", "not valid base64 data"),
             (_data_url(b"plain text"), "not an image"),
             ("notes.png", "not an image"),
             ("http://127.0.0.1:9/cat.png", "the address could not be fetched"),
             ("", "an empty reference")]
    for ref, fragment in cases:
        for fn in (open_image, image_size):
            with pytest.raises(ImageError) as e:
                fn(ref)
            assert isinstance(e.value, ValueError) and fragment in str(e.value) and "\n" not in str(e.value), \
                (ref, str(e.value))
    for ref in ("cut.png", "cut.jpg"):  # the header is whole: only decoding finds the file cut short
        assert image_size(ref) == (64, 48)
        with pytest.raises(ImageError, match="corrupt or truncated"):
            open_image(ref)
    with pytest.raises(ImageError, match="download it and pass the local path"):
        open_image("http://127.0.0.1:9/cat.png", timeout=2)
