"""`tunesmith data stats` and `data inspect` count image tokens before training (issue #31): per picture as the
model's image processor resizes it, within --max_pixels / MAX_PIXELS, toward --max_length, naming the rows over it."""
import numpy as np

from conftest import colour_rows, write_jsonl
from tunesmith.commands import data as data_command
from tunesmith.config.parser import parse_args


def _stats(argv, capsys=None):
    args = parse_args("data", ["stats", *argv])
    return data_command.stats(args)


def test_stats_count_image_tokens_as_the_processor_resizes(tiny_vl_models, tmp_path, capsys, monkeypatch):
    from PIL import Image
    from transformers import AutoImageProcessor

    model_dir = tiny_vl_models("qwen2_5_vl")
    rows = colour_rows(tmp_path / "pics", 6, sizes=((56, 56), (224, 168)))
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    s = _stats(["--dataset", data, "--model", model_dir, "--max_length", "30"])
    proc = AutoImageProcessor.from_pretrained(model_dir)
    expect = [int(np.prod(proc([Image.open(r["images"][0]).convert("RGB")])["image_grid_thw"][0])) // 4 for r in rows]
    assert s["images"]["pictures"] == 6 and s["images"]["image_tokens"]["total"] == sum(expect)
    assert s["images"]["image_tokens"]["max"] == max(expect) and max(expect) > min(expect)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = [len(tok.apply_chat_template([{"role": "user", "content": "What colour is this?"}, r["messages"][1]],
                                        tokenize=True)["input_ids"]) for r in rows]
    lengths = [t + 2 + n for t, n in zip(text, expect)]  # + <|vision_start|> <|vision_end|> around the pads
    assert s["tokens"]["total"] == sum(lengths)
    over = s["over_max_length"]
    assert over["sequences"] == sum(n > 30 for n in lengths) > 0
    assert all("image tokens" in r for r in over["first_rows"])
    out = capsys.readouterr().out
    assert "image tokens per sequence" in out and "first rows over it" in out
    monkeypatch.setenv("MAX_PIXELS", str(4 * 28 * 28))  # every picture down to at most 4 tokens
    small = _stats(["--dataset", data, "--model", model_dir])
    assert small["images"]["image_tokens"]["max"] == 4 and small["images"]["max_pixels"] == 4 * 28 * 28


def test_stats_without_a_model_use_the_released_qwen_vl_budget(tmp_path, capsys):
    """Without --model, rows with images are measured with Qwen2.5-VL's released image processor settings (patch
    14, 3,136 to 12,845,056 pixels): a 448x448 picture is 256 tokens."""
    from PIL import Image

    path = str(tmp_path / "p.png")
    Image.new("RGB", (448, 448), (1, 2, 3)).save(path)
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "<image>hi"},
                                                            {"role": "assistant", "content": "ok"}],
                                               "images": [path]}])
    s = _stats(["--dataset", data])
    assert s["images"]["image_tokens"]["total"] == 256
    assert "qwen2_5_vl" in capsys.readouterr().err


def test_inspect_shows_each_picture_once_with_its_tokens(tiny_vl_models, tmp_path, capsys):
    model_dir = tiny_vl_models("qwen2_5_vl")
    data = write_jsonl(tmp_path / "d.jsonl", colour_rows(tmp_path / "pics", 1, sizes=((112, 84),)))
    data_command.inspect(parse_args("data", ["inspect", "--dataset", data, "--model", model_dir]))
    out = capsys.readouterr().out
    assert "<|image_pad|>×12<|vision_end|>" in out and "of which 12 image tokens for 1 picture" in out
