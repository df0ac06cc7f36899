"""`tunesmith pt` (continued pre-training, issue #32 item 1): ms-swift's PretrainArguments defaults — no chat
template, every token trained, no packing unless asked — on `.txt` corpora and `text` rows, whole or streamed."""
import json

import pytest

from conftest import train, write_jsonl
from tunesmith.config.parser import parse_args
from tunesmith.data.encode import ChatEncoder
from tunesmith.data.tiny_tokenizer import build_tokenizer

LINES = ["The cat sat on the mat.", "A second line of plain text, a little longer than the first one.",
         "red blue green", "one more line to train on", "gold pink gray white black"]


def test_pt_defaults_are_ms_swifts():
    """swift/arguments/pretrain_args.py: use_chat_template False, loss_scale all; packing stays off (SftArguments'
    default); everything else is sft's."""
    pt, sft = parse_args("pt", []), parse_args("sft", [])
    assert (pt.use_chat_template, pt.loss_scale, pt.packing) == (False, "all", False)
    assert (sft.use_chat_template, sft.loss_scale) == (True, None)
    assert parse_args("pt", ["--use_chat_template", "true"]).use_chat_template is True
    assert parse_args("pt", ["--streaming", "true", "--packing", "true"]).streaming is True


def test_plain_text_adds_the_tokenizers_own_specials_and_eos():
    """ms-swift's generation template: the BOS the tokenizer itself puts before a text (none for Qwen), the text,
    EOS; every token a label."""
    tok = build_tokenizer("qwen2")
    enc = ChatEncoder(tok, use_chat_template=False).encode({"messages": [{"role": "assistant", "content": "hi"}]})
    assert enc.input_ids == tok("hi")["input_ids"] + [tok.eos_token_id] and enc.labels == enc.input_ids


def _trained_token_counter(monkeypatch):
    """Every micro-batch's trained-token count, as SFT's loss sees it (tunesmith.train.methods.sft.token_loss)."""
    import tunesmith.train.methods.sft as sft

    seen, original = [], sft.token_loss

    def spy(*args, **kwargs):
        parts, stats = original(*args, **kwargs)
        seen.append(stats["n_tokens"])
        return parts, stats

    monkeypatch.setattr(sft, "token_loss", spy)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True])
def test_pt_trains_every_token_of_a_txt_corpus(tiny_models, tmp_path, monkeypatch, streaming):
    """One epoch of `tunesmith pt` over a .txt file and a jsonl of `text` rows trains every token of the corpus's
    own tokenisation (text + EOS per line) except each row's first, which nothing precedes: an independent count
    (the tokenizer alone) equals the tokens the loss was computed on — whole or streamed."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(LINES[:3]) + "\n\n", encoding="utf-8")  # a blank line is no row
    rows = write_jsonl(tmp_path / "more.jsonl", [{"text": t} for t in LINES[3:]])
    seen = _trained_token_counter(monkeypatch)
    steps = ["--max_steps", "3", "--streaming", "true", "--dataset_shuffle", "false"] if streaming else \
        ["--num_train_epochs", "1"]
    res = train("pt", "--model", tiny_models("qwen2"), "--dataset", str(corpus), rows, "--train_type", "full",
                "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", *steps,
                "--output_dir", tmp_path / "out", "--report_to", "none", "--save_strategy", "no")
    tok = res["tokenizer"]
    expected = sum(len(tok(line)["input_ids"]) + 1 - 1 for line in LINES)  # + EOS, − the first token
    assert sum(seen) == expected == 46
    args = json.load(open(f"{res['run_dir']}/args.json", encoding="utf-8"))
    assert (args["use_chat_template"], args["loss_scale"]) == (False, "all")
