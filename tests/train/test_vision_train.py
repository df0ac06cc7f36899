"""Vision-language training (issue #31) on tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL models and generated
pictures: masks equal an independent computation from the processor's rendering, packed rows equal padded ones, SFT
learns to tell colours on held-out pictures, DPO and KTO train on image pairs, the freeze flags pick what trains,
the image budget flags count as the processor does, and a reward model orders image pairs by their picture."""
import os

import numpy as np
import pytest
import torch

from conftest import COLOURS, colour_rows, read_jsonl, train, write_jsonl


def _spec(model_dir, max_pixels=None):
    from transformers import AutoConfig, AutoTokenizer
    from tunesmith.models.vision import image_tokens

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok, image_tokens(model_dir, AutoConfig.from_pretrained(model_dir), tok, max_pixels)


def _model(model_dir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir).eval()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_masks_equal_an_independent_rendering(tiny_vl_models, tmp_path, family):
    """Image placeholders and the prompt are never trained, the answer and its end of turn are: the same ids and
    labels as the chat template's own rendering of content parts, each placeholder repeated as often as the image
    processor's own output says (grid_t·grid_h·grid_w / merge²), the answer located by the generation prompt."""
    from tunesmith.data.encode import IGNORE, ChatEncoder

    model_dir = tiny_vl_models(family)
    tok, spec = _spec(model_dir)
    rows = colour_rows(tmp_path, 2, seed=3)
    paths = [r["images"][0] for r in rows]
    record = {"messages": [{"role": "user", "content": "first <image> then <image> which?"},
                           {"role": "assistant", "content": "the second"}], "images": paths}
    enc = ChatEncoder(tok, images=spec).encode(record)

    from PIL import Image
    grids = spec.processor([Image.open(p).convert("RGB") for p in paths])["image_grid_thw"]
    counts = [int(np.prod(g)) // spec.merge_size ** 2 for g in grids]
    parts = [{"type": "text", "text": "first "}, {"type": "image"}, {"type": "text", "text": " then "},
             {"type": "image"}, {"type": "text", "text": " which?"}]
    user = [{"role": "user", "content": parts}]

    def expanded(text):
        pieces = text.split("<|image_pad|>")
        out = pieces[0]
        for n, piece in zip(counts, pieces[1:]):
            out += "<|image_pad|>" * n + piece
        return tok(out, add_special_tokens=False)["input_ids"]

    full = expanded(tok.apply_chat_template(user + [{"role": "assistant", "content": "the second"}], tokenize=False))
    prompt = expanded(tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True))
    tail = len(tok("\n", add_special_tokens=False)["input_ids"])  # after <|im_end|>: the template's newline
    expect = [IGNORE] * len(prompt) + full[len(prompt):len(full) - tail] + [IGNORE] * tail
    assert enc.input_ids == full
    assert enc.labels == expect
    assert enc.input_ids.count(spec.image_token_id) == sum(counts) and sum(counts) > 2
    assert all(lab == IGNORE for i, lab in zip(enc.input_ids, enc.labels) if i == spec.image_token_id)
    assert enc.images == paths


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_packed_and_padding_free_equal_padded(tiny_vl_models, tmp_path, family):
    """The trained tokens' log-probs of a mixed batch (one picture, none, two) are the same padded, padding-free and
    packed in another grouping: each sequence's 3-D M-RoPE positions are its own (packed_mrope_positions) and no
    attention crosses sequences."""
    from tunesmith.data.collate import PackedCollate, flat_collate, pad_collate
    from tunesmith.data.encode import ChatEncoder
    from tunesmith.data.vision import with_pixels
    from tunesmith.train.ops.token_logps import token_logps

    model_dir = tiny_vl_models(family)
    tok, spec = _spec(model_dir)
    pics = [r["images"][0] for r in colour_rows(tmp_path, 3, seed=1)]
    records = [{"messages": [{"role": "user", "content": "<image>What colour?"},
                             {"role": "assistant", "content": "red it is"}], "images": pics[:1]},
               {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}]},
               {"messages": [{"role": "user", "content": "two <image> and <image> ok"},
                             {"role": "assistant", "content": "blue and green"}], "images": pics[1:]}]
    enc = ChatEncoder(tok, images=spec)
    rows = [enc.encode(r) for r in records]
    model = _model(model_dir)
    pad = with_pixels(lambda rs: pad_collate(rs, tok.pad_token_id), spec)
    with torch.no_grad():
        padded = token_logps(model, pad(rows)).logps
        flat = token_logps(model, with_pixels(lambda rs: flat_collate(rs, tok.pad_token_id), spec)(rows)).logps
        packed = token_logps(model, with_pixels(PackedCollate(tok.pad_token_id), spec)(
            [[rows[2], rows[0]], [rows[1]]])).logps
        alone = torch.cat([token_logps(model, pad([r])).logps for r in (rows[2], rows[0], rows[1])])
        no_pictures = token_logps(model, {k: v for k, v in pad(rows[:1]).items()
                                          if k not in ("pixel_values", "image_grid_thw", "image_counts")}).logps
    assert torch.allclose(padded, flat, atol=1e-5)
    assert torch.allclose(packed, alone, atol=1e-5)
    assert not torch.allclose(padded[:no_pictures.numel()], no_pictures, atol=1e-3)  # the pixels matter


def _answer_accuracy(model, tok, spec, rows) -> float:
    """Share of rows whose own colour gets the highest summed log-prob among the three answers."""
    from tunesmith.data.collate import pad_collate
    from tunesmith.data.encode import ChatEncoder
    from tunesmith.data.vision import with_pixels
    from tunesmith.train.reference import sequence_logps

    enc = ChatEncoder(tok, images=spec)
    collate = with_pixels(lambda rs: pad_collate(rs, tok.pad_token_id), spec)
    right = 0
    for row in rows:
        cands = [enc.encode({**row, "messages": [row["messages"][0], {"role": "assistant", "content": c}]})
                 for c in sorted(COLOURS)]
        with torch.no_grad():
            scores = sequence_logps(model, collate(cands)).logps
        right += sorted(COLOURS)[int(scores.argmax())] == row["messages"][1]["content"]
    return right / len(rows)


@pytest.mark.slow
def test_sft_tells_colours_of_held_out_pictures(tiny_vl_models, tmp_path):
    """SFT (LoRA on the language model, vision tower frozen: ms-swift's defaults) on "what colour is this?" over
    generated pictures: on 30 held-out pictures of new sizes and shades the right colour scores highest for at least
    80% (chance: 33%), from no better than chance before."""
    model_dir = tiny_vl_models("qwen2_5_vl")
    data = write_jsonl(tmp_path / "train.jsonl", colour_rows(tmp_path / "train", 96, seed=0))
    held_out = colour_rows(tmp_path / "held", 30, seed=7, sizes=((70, 70), (98, 56)))
    tok, spec = _spec(model_dir)
    before = _answer_accuracy(_model(model_dir), tok, spec, held_out)
    res = train("sft", "--model", model_dir, "--dataset", data, "--learning_rate", "3e-3", "--lora_rank", "16",
                "--max_steps", "60", "--per_device_train_batch_size", "8", "--warmup_ratio", "0",
                "--output_dir", tmp_path / "out", "--report_to", "none", "--save_strategy", "no",
                "--logging_steps", "10")
    after = _answer_accuracy(res["model"].eval(), tok, spec, held_out)
    assert before <= 0.5 and after >= 0.8, (before, after)


def _pairs(rows):
    names = sorted(COLOURS)
    return [{**r, "rejected_response": names[(names.index(r["messages"][1]["content"]) + 1) % 3]} for r in rows]


@pytest.mark.slow
def test_dpo_on_image_pairs_raises_reward_accuracy(tiny_vl_models, tmp_path):
    """DPO on pairs that share their picture (the right colour chosen, another rejected): rewards/accuracies rises
    from the first logged step to at least 0.9 and the loss falls below log 2."""
    from conftest import step_losses

    model_dir = tiny_vl_models("qwen2_5_vl")
    data = write_jsonl(tmp_path / "dpo.jsonl", _pairs(colour_rows(tmp_path / "pics", 48, seed=2)))
    res = train("rlhf", "--rlhf_type", "dpo", "--model", model_dir, "--dataset", data, "--learning_rate", "2e-3",
                "--max_steps", "16", "--per_device_train_batch_size", "6", "--logging_steps", "4",
                "--output_dir", tmp_path / "out", "--report_to", "none", "--save_strategy", "no")
    log = [r for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "rewards/accuracies" in r]
    assert log[-1]["rewards/accuracies"] >= 0.9 and log[-1]["rewards/accuracies"] > log[0]["rewards/accuracies"]
    assert step_losses(res["run_dir"])[-1] < 0.6931


def test_precomputed_reference_sees_the_pictures(tiny_vl_models, tmp_path):
    """--precompute_ref_log_probs computes the reference's log-probs with each pair's pixels: the first step's loss
    and rewards equal those of the live reference (a reference computed without the pictures would differ)."""
    model_dir = tiny_vl_models("qwen2_5_vl")
    data = write_jsonl(tmp_path / "dpo.jsonl", _pairs(colour_rows(tmp_path / "pics", 8, seed=4)))
    firsts = []
    for precompute in ("false", "true"):
        res = train("rlhf", "--rlhf_type", "dpo", "--model", model_dir, "--dataset", data, "--max_steps", "1",
                    "--per_device_train_batch_size", "4", "--logging_steps", "1", "--report_to", "none",
                    "--precompute_ref_log_probs", precompute, "--output_dir", tmp_path / f"out-{precompute}",
                    "--save_strategy", "no", "--learning_rate", "1e-3")
        firsts.append(read_jsonl(os.path.join(res["run_dir"], "logging.jsonl"))[0])
    for key in ("loss", "logps/chosen", "logps/rejected"):
        assert firsts[0][key] == pytest.approx(firsts[1][key], abs=1e-5), key


def test_kto_trains_on_image_rows(tiny_vl_models, tmp_path):
    """KTO rows with a picture and a label: the run trains, and its mismatched (KL) sequences keep their prompt's
    picture (a placeholder without pixels would stop the model)."""
    rows = colour_rows(tmp_path / "pics", 12, seed=5)
    names = sorted(COLOURS)
    kto = [{**r, "label": True} if i % 2 else
           {**r, "messages": [r["messages"][0], {"role": "assistant", "content": names[(names.index(
               r["messages"][1]["content"]) + 1) % 3]}], "label": False} for i, r in enumerate(rows)]
    res = train("rlhf", "--rlhf_type", "kto", "--model", tiny_vl_models("qwen2_5_vl"),
                "--dataset", write_jsonl(tmp_path / "kto.jsonl", kto), "--max_steps", "2",
                "--per_device_train_batch_size", "4", "--logging_steps", "1", "--report_to", "none",
                "--output_dir", tmp_path / "out", "--save_strategy", "no")
    log = read_jsonl(os.path.join(res["run_dir"], "logging.jsonl"))
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)


def _trainable_parts(model):
    from tunesmith.models.vision import PARTS, part_of

    kind = model.config.model_type
    return {part_of(n, PARTS[kind]) for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("flags, parts", [
    ([], {"language_model"}),                                     # ms-swift's defaults: ViT and aligner frozen
    (["--freeze_vit", "false"], {"language_model", "vision_tower"}),
    (["--freeze_aligner", "false", "--freeze_llm", "true"], {"aligner"}),
])
def test_lora_all_linear_follows_the_freeze_flags(tiny_vl_models, tmp_path, flags, parts):
    """LoRA all-linear goes on the Linear layers of the parts left trained, never on lm_head."""
    res = train("sft", "--model", tiny_vl_models("qwen2_5_vl"), "--dataset",
                write_jsonl(tmp_path / "d.jsonl", colour_rows(tmp_path / "pics", 4)), "--max_steps", "1",
                "--output_dir", tmp_path / "out", "--report_to", "none", "--save_strategy", "no", *flags)
    assert _trainable_parts(res["model"]) == parts
    assert not any("lm_head" in n for n, p in res["model"].named_parameters() if p.requires_grad)


def test_full_training_freezes_parts_and_steps_them_at_their_rates(tiny_vl_models, tmp_path):
    """--train_type full --freeze_vit false: the vision tower and language model train, the aligner stays frozen
    (its weights unchanged after a step); --vit_lr gives the vision tower its own learning rate."""
    from safetensors.torch import load_file

    model_dir = tiny_vl_models("qwen2_5_vl")
    res = train("sft", "--model", model_dir, "--dataset",
                write_jsonl(tmp_path / "d.jsonl", colour_rows(tmp_path / "pics", 4)), "--max_steps", "1",
                "--train_type", "full", "--freeze_vit", "false", "--vit_lr", "3e-5", "--learning_rate", "1e-3",
                "--output_dir", tmp_path / "out", "--report_to", "none", "--save_strategy", "no")
    model = res["model"]
    assert _trainable_parts(model) == {"language_model", "vision_tower"}
    before = load_file(os.path.join(model_dir, "model.safetensors"))
    after = model.state_dict()
    merger = [n for n in after if ".merger." in n]
    moved = [n for n in after if ".blocks.0." in n and n.endswith("qkv.weight")]
    saved = {n: next(v for k, v in before.items() if n.endswith(k)) for n in merger + moved}
    assert merger and all(torch.equal(saved[n], after[n]) for n in merger)
    assert moved and not any(torch.equal(saved[n], after[n]) for n in moved)


def test_vit_and_aligner_learning_rates(tiny_vl_models):
    """--vit_lr and --aligner_lr (ms-swift's multimodal optimiser): the vision tower's and the aligner's parameters
    step at their own rates, the rest at --learning_rate, each split into decay / no-decay groups."""
    from types import SimpleNamespace

    from tunesmith.models.vision import PARTS, part_of
    from tunesmith.train.knobs.vision_lr import vision_lr_optimizer

    model = _model(tiny_vl_models("qwen2_5_vl"))
    optim = SimpleNamespace(learning_rate=1e-3, vit_lr=3e-5, aligner_lr=None, weight_decay=0.1)
    opt = vision_lr_optimizer(model, torch.optim.AdamW, {"lr": 1e-3}, optim)
    where = {id(p): part_of(n, PARTS["qwen2_5_vl"]) for n, p in model.named_parameters()}
    rates = {}
    for g in opt.param_groups:
        for p in g["params"]:
            rates.setdefault(where[id(p)], set()).add(g["lr"])
    assert rates == {"vision_tower": {3e-5}, "aligner": {1e-3}, "language_model": {1e-3}}
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(1 for _ in model.parameters())


def test_all_parts_frozen_is_refused(tiny_vl_models, tmp_path):
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError, match="nothing would train"):
        train("sft", "--model", tiny_vl_models("qwen2_5_vl"), "--dataset",
              write_jsonl(tmp_path / "d.jsonl", colour_rows(tmp_path / "pics", 2)), "--max_steps", "1",
              "--freeze_llm", "true", "--output_dir", tmp_path / "out", "--report_to", "none")


def test_text_model_refuses_image_rows(tiny_models, tmp_path):
    """A text-only model given rows with pictures: a located bad row (the pictures would be left out), dropped and
    counted under --strict false."""
    from tunesmith.errors import DataError

    rows = colour_rows(tmp_path / "pics", 3)
    text = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data = write_jsonl(tmp_path / "d.jsonl", rows + [text] * 4)
    with pytest.raises(DataError) as e:
        train("sft", "--model", tiny_models("qwen2"), "--dataset", data, "--max_steps", "1",
              "--output_dir", tmp_path / "out", "--report_to", "none")
    assert "d.jsonl:1" in str(e.value) and "text only" in str(e.value) and "images" in str(e.value)
    res = train("sft", "--model", tiny_models("qwen2"), "--dataset", data, "--max_steps", "1", "--strict", "false",
                "--output_dir", tmp_path / "out2", "--report_to", "none", "--save_strategy", "no")
    assert res["state"] is not None


def test_image_budget_flags_and_environment(tiny_vl_models, tmp_path):
    """--max_pixels, else MAX_PIXELS, else IMAGE_MAX_TOKEN_NUM (tokens), else the processor's own budget: a large
    picture costs max_pixels / 28² tokens at most, as the processor's own resize gives."""
    from PIL import Image
    from tunesmith.errors import ConfigError
    from tunesmith.models.vision import pixel_limits

    model_dir = tiny_vl_models("qwen2_5_vl")
    big = str(tmp_path / "big.png")
    Image.new("RGB", (560, 420), (9, 9, 9)).save(big)
    tok, spec = _spec(model_dir)
    assert spec.limits["max_pixels"] == 16 * 28 * 28 and spec.tokens_of(big) <= 16
    _, wide = _spec(model_dir, max_pixels=64 * 28 * 28)
    grid = wide.processor([Image.open(big).convert("RGB")])["image_grid_thw"][0]
    assert wide.tokens_of(big) == int(np.prod(grid)) // 4 and 16 < wide.tokens_of(big) <= 64
    proc = spec.processor
    assert pixel_limits(proc, 14, 2, None, {"MAX_PIXELS": "50176"})["max_pixels"] == 50176
    assert pixel_limits(proc, 14, 2, None, {"IMAGE_MAX_TOKEN_NUM": "32"})["max_pixels"] == 32 * 28 * 28
    assert pixel_limits(proc, 14, 2, 1000, {"MAX_PIXELS": "50176"}) == {"max_pixels": 1000, "min_pixels": 1000}
    with pytest.raises(ConfigError, match="MAX_PIXELS"):
        pixel_limits(proc, 14, 2, None, {"MAX_PIXELS": "lots"})
    with pytest.raises(ConfigError, match="above max_pixels"):
        pixel_limits(proc, 14, 2, 1000, {"MIN_PIXELS": "5000"})
    with pytest.raises(ConfigError, match="below one image token"):
        pixel_limits(proc, 14, 2, 100, {})


def test_truncation_never_cuts_a_picture(tiny_vl_models, tmp_path):
    """--truncation_strategy left/right that would cut through a picture's tokens drops the row as too long (a
    picture cut in part no longer matches its features); a cut after the picture keeps it."""
    from tunesmith.data.encode import ChatEncoder, TooLong

    tok, spec = _spec(tiny_vl_models("qwen2_5_vl"))
    row = colour_rows(tmp_path, 1)[0]
    row = {**row, "messages": [row["messages"][0], {"role": "assistant", "content": "red " * 30}]}
    full = ChatEncoder(tok, images=spec).encode(row).input_ids
    n, first = len(full), full.index(spec.image_token_id)
    with pytest.raises(TooLong):
        ChatEncoder(tok, images=spec, max_length=n - first - 1, truncation_strategy="left").encode(row)
    assert ChatEncoder(tok, images=spec, max_length=n - first, truncation_strategy="left").encode(row).images
    kept = ChatEncoder(tok, images=spec, max_length=n - 5, truncation_strategy="right").encode(row)
    assert len(kept.input_ids) == n - 5 and kept.images == row["images"]


def test_a_batch_with_pictures_but_no_pixels_is_refused(tiny_vl_models, tmp_path):
    """Training must never run a picture's placeholders without its pixels."""
    from tunesmith.data.collate import pad_collate
    from tunesmith.data.encode import ChatEncoder
    from tunesmith.train.ops.token_logps import token_logps

    model_dir = tiny_vl_models("qwen2_5_vl")
    tok, spec = _spec(model_dir)
    row = ChatEncoder(tok, images=spec).encode(colour_rows(tmp_path, 1)[0])
    with pytest.raises(RuntimeError, match="no pixel_values"):
        token_logps(_model(model_dir), pad_collate([row], tok.pad_token_id))


def test_checkpoints_and_merged_models_carry_the_image_processor(tiny_vl_models, tmp_path):
    """A LoRA checkpoint, a full checkpoint and `export --merge_lora` each hold preprocessor_config.json, so infer,
    deploy and later training load them as the base model (the image processor's budget included)."""
    from tunesmith.cli import main

    model_dir = tiny_vl_models("qwen2_5_vl")
    data = write_jsonl(tmp_path / "d.jsonl", colour_rows(tmp_path / "pics", 2))
    for kind in ("lora", "full"):
        res = train("sft", "--model", model_dir, "--dataset", data, "--max_steps", "1", "--train_type", kind,
                    "--output_dir", tmp_path / kind, "--report_to", "none")
        ckpt = os.path.join(res["run_dir"], "checkpoint-1")
        assert os.path.isfile(os.path.join(ckpt, "preprocessor_config.json")), kind
    assert main(["export", "--adapters", os.path.join(tmp_path, "lora", os.listdir(tmp_path / "lora")[0],
                                                      "checkpoint-1"),
                 "--merge_lora", "true", "--output_dir", str(tmp_path / "merged")]) == 0
    assert os.path.isfile(tmp_path / "merged" / "preprocessor_config.json")
    _spec(str(tmp_path / "merged"))  # loads as a vision-language model again


def test_encoding_decodes_no_picture(tiny_vl_models, tmp_path, monkeypatch):
    """Encoding a dataset counts each picture's tokens from its header: no picture is decoded (open_image is the
    only decoder; here it fails if called), so memory does not grow with the pictures (bench/vl_encode_memory.py:
    2,000 640x480 pictures encode at the same peak as the text rows)."""
    import tunesmith.data.images as images
    from tunesmith.config.parser import parse_args
    from tunesmith.train import recipe
    from tunesmith.train.setup import prepare_data

    def refuse(ref, *a, **k):
        raise AssertionError(f"decoded {ref}")

    monkeypatch.setattr(images, "open_image", refuse)
    data = write_jsonl(tmp_path / "d.jsonl", colour_rows(tmp_path / "pics", 12))
    cfg, method = recipe.configure(parse_args("sft", ["--model", tiny_vl_models("qwen2_5_vl"), "--dataset", data]))
    rows = prepare_data(cfg.data, cfg.model, method).train_rows
    assert len(rows) == 12 and all(r.images for r in rows)


EVEN_TOKENS = '''
from swift.plugin import ORM, orms


class EvenTokens(ORM):
    def __call__(self, completions, response_token_ids=None, images=None, **kwargs):
        assert images is not None and all(len(i) == 1 for i in images)  # the rows' pictures reach the rewards
        return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in response_token_ids]


orms["even_tokens"] = EvenTokens
'''


@pytest.mark.slow
def test_grpo_with_image_prompts_raises_its_reward(tiny_vl_models, tmp_path, monkeypatch):
    """GRPO on prompts with pictures: every completion is sampled with its prompt's pixels (the engine is given
    them), no picture placeholder is ever sampled (one would break the next forward: 'Image features and image
    tokens do not match'), the reward functions see the rows' `images`, and a reward the model can reach rises."""
    from tunesmith.inference.engine import GenerationEngine

    submitted = []
    real_submit = GenerationEngine.submit

    def spy(self, prompt_ids, params, adapter=None, loop=None, images=None):
        submitted.append(images is not None and images["pixel_values"].shape[0] > 0)
        return real_submit(self, prompt_ids, params, adapter, loop, images)

    monkeypatch.setattr(GenerationEngine, "submit", spy)
    model_dir = tiny_vl_models("qwen2_5_vl")
    rows = [{"messages": [r["messages"][0]], "solution": r["messages"][1]["content"], "images": r["images"]}
            for r in colour_rows(tmp_path / "pics", 16)]
    plugin = tmp_path / "plugin.py"
    plugin.write_text(EVEN_TOKENS)
    res = train("rlhf", "--rlhf_type", "grpo", "--model", model_dir, "--dataset", write_jsonl(tmp_path / "p.jsonl", rows),
                "--external_plugins", plugin, "--reward_funcs", "even_tokens", "--num_generations", "8",
                "--per_device_train_batch_size", "32", "--max_completion_length", "12", "--train_type", "full",
                "--learning_rate", "5e-3", "--max_steps", "40", "--logging_steps", "1", "--save_strategy", "no",
                "--report_to", "none", "--output_dir", tmp_path / "out", "--log_completions", "true")
    log = [r for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "reward" in r]
    first = sum(r["reward"] for r in log[:5]) / 5
    last = sum(r["reward"] for r in log[-5:]) / 5
    assert last > first + 0.12, (first, last)  # measured: 0.50 -> 0.68
    assert submitted and all(submitted)
    logged = read_jsonl(os.path.join(res["run_dir"], "completions.jsonl"))[0]
    assert logged["images"][0] in [r["images"][0] for r in rows]  # each rollout line says which picture


def test_the_engine_never_samples_a_picture_placeholder(tiny_vl_models):
    """Even a model whose most likely next token is `<|image_pad|>` never generates it (greedy, sampled, beam):
    a placeholder without a picture breaks the next turn and GRPO's training forward."""
    from tunesmith.inference.engine import GenerationEngine, SamplingParams

    model_dir = tiny_vl_models("qwen2_5_vl")
    tok, spec = _spec(model_dir)
    model = _model(model_dir)
    ids = tok("hello there", add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # the placeholder's output row: ten times the winning token's, so it wins instead
        best = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        model.lm_head.weight[spec.image_token_id] = 10 * model.lm_head.weight[best]
        plain = model(torch.tensor([ids])).logits[0, -1]
    assert int(plain.argmax()) == spec.image_token_id  # what an unguarded sampler would pick
    engine = GenerationEngine(model, tok, stop_ids={tok.eos_token_id})
    try:
        for params in (SamplingParams(max_new_tokens=6, temperature=0.0),
                       SamplingParams(max_new_tokens=6, temperature=1.0, seed=3),
                       SamplingParams(max_new_tokens=6, num_beams=2)):
            out = engine.generate([ids], params)[0].token_ids
            assert out and spec.image_token_id not in out, params
    finally:
        engine.close()


def _processor_class_or_reason(model_dir):
    """transformers' own processor for the model, or why it cannot be built here (its video processor imports
    torchvision, whose default wheels are CUDA builds that do not load against a CPU-only torch)."""
    try:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model_dir), None
    except Exception as e:  # noqa: BLE001 - any failure to build it is the reason to skip
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return None, f"{type(e).__name__}: {(lines or ['(no message)'])[0][:160]}"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_expansion_and_pixels_equal_the_processor_where_torchvision_loads(tiny_vl_models, tmp_path, family):
    """Where transformers' processor class can be built (torchvision loads), its input_ids, pixel_values and
    image_grid_thw for a rendered prompt equal tunesmith's (image processor + placeholder expansion)."""
    from tunesmith.data.encode import ChatEncoder
    from tunesmith.data.vision import pixel_inputs

    model_dir = tiny_vl_models(family)
    processor, reason = _processor_class_or_reason(model_dir)
    if processor is None:
        pytest.skip(f"the processor class needs torchvision, which does not load here ({reason})")
    tok, spec = _spec(model_dir)
    pics = [r["images"][0] for r in colour_rows(tmp_path, 2, sizes=((112, 84), (56, 112)))]
    record = {"messages": [{"role": "user", "content": "<image> and <image>?"},
                           {"role": "assistant", "content": "two"}], "images": pics}
    ours = ChatEncoder(tok, images=spec).encode(record)
    from PIL import Image
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " and "},
                                                                 {"type": "image"}, {"type": "text", "text": "?"}]},
                                    {"role": "assistant", "content": "two"}], tokenize=False)
    theirs = processor(text=[text], images=[Image.open(p).convert("RGB") for p in pics], return_tensors="pt")
    assert theirs["input_ids"][0].tolist() == ours.input_ids
    mine = pixel_inputs([pics], spec)
    assert torch.equal(theirs["image_grid_thw"], mine["image_grid_thw"])
    assert torch.allclose(theirs["pixel_values"].float(), mine["pixel_values"], atol=1e-5)


def test_break_it_findings_are_located_errors(tiny_vl_models, tiny_models, tmp_path):
    """From the new-user review: a picture the image processor cannot resize (over 200:1) is a located bad row,
    dropped under --strict false; GRPO refuses pictures for a text model before sampling; --vit_lr must be a
    positive rate; a short raw-base64 picture is read as a picture."""
    import base64
    import io

    from PIL import Image

    from tunesmith.config.parser import parse_args
    from tunesmith.data.images import to_reference
    from tunesmith.errors import ConfigError, DataError, FlagError

    Image.new("RGB", (10000, 20), (1, 2, 3)).save(tmp_path / "wide.png")
    rows = colour_rows(tmp_path / "pics", 4)
    wide = {**rows[0], "images": [str(tmp_path / "wide.png")]}
    data = write_jsonl(tmp_path / "d.jsonl", rows + [wide])
    model_dir = tiny_vl_models("qwen2_5_vl")
    with pytest.raises(DataError) as e:
        train("sft", "--model", model_dir, "--dataset", data, "--max_steps", "1", "--output_dir", tmp_path / "o1",
              "--report_to", "none")
    assert "d.jsonl:5" in str(e.value) and "10000x20" in str(e.value) and "crop or pad" in str(e.value)
    assert str(e.value).count("Fix:") == 1
    res = train("sft", "--model", model_dir, "--dataset", data, "--max_steps", "1", "--strict", "false",
                "--output_dir", tmp_path / "o2", "--report_to", "none", "--save_strategy", "no")
    assert res["state"] is not None

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"messages": [r["messages"][0]], "solution": "red",
                                                  "images": r["images"]} for r in rows])
    with pytest.raises(DataError, match="prompt\\(s\\) hold pictures .*, but the model takes text only"):
        train("rlhf", "--rlhf_type", "grpo", "--model", tiny_models("qwen2"), "--dataset", prompts,
              "--reward_funcs", "format", "--num_generations", "2", "--per_device_train_batch_size", "2",
              "--max_steps", "1", "--output_dir", tmp_path / "o3", "--report_to", "none")

    from tunesmith.train.recipe import configure
    for flag in ("--vit_lr", "--aligner_lr"):
        with pytest.raises((ConfigError, FlagError), match=flag.lstrip("-")):
            configure(parse_args("sft", ["--model", model_dir, "--dataset", data, flag, "-1"]))

    buf = io.BytesIO()
    Image.new("RGB", (2, 2), (9, 9, 9)).save(buf, format="PNG")
    raw = base64.b64encode(buf.getvalue()).decode()
    assert len(raw) < 200 and to_reference(raw).startswith("data:image/png;base64,")


def test_infer_strict_false_skips_rows_whose_pictures_cannot_be_used(tiny_vl_models, tmp_path, capsys):
    """`infer --val_dataset --strict false`: a row whose picture cannot be used (a placeholder typed as text with
    no picture) is skipped and counted; the other rows get their result lines. --strict true stops at it."""
    from tunesmith.cli import main

    rows = colour_rows(tmp_path / "pics", 2)
    odd = {"messages": [{"role": "user", "content": "<|image_pad|> what?"}]}
    data = write_jsonl(tmp_path / "v.jsonl", [rows[0], odd, rows[1]])
    out = tmp_path / "res.jsonl"
    rc = main(["infer", "--model", tiny_vl_models("qwen2_5_vl"), "--val_dataset", data, "--strict", "false",
               "--max_new_tokens", "2", "--result_path", str(out)])
    err = capsys.readouterr().err
    assert rc == 0 and "1 row(s) whose pictures cannot be used skipped" in err and "v.jsonl:2" in err, err
    assert len(read_jsonl(out)) == 2
    rc = main(["infer", "--model", tiny_vl_models("qwen2_5_vl"), "--val_dataset", data, "--max_new_tokens", "2",
               "--result_path", str(tmp_path / "strict.jsonl")])
    assert rc != 0 and "v.jsonl:2" in capsys.readouterr().err


def test_vision_flags_on_a_text_model_and_huge_pictures_are_refused_up_front(tiny_models, tmp_path):
    """--vit_lr on a local text model is a flag problem before anything loads (exit 2, nothing written); a picture
    over PIL's decompression-bomb limit is a located bad row, not a warning and a decode of gigabytes later."""
    from PIL import Image

    from tunesmith.cli import main
    from tunesmith.data.load import load_datasets

    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "yo"}]}])
    assert main(["sft", "--model", tiny_models("qwen2"), "--dataset", data, "--vit_lr", "1e-5",
                 "--output_dir", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1000  # a small limit stands in for 89 megapixels
    try:
        Image.new("RGB", (40, 40)).save(tmp_path / "big.png")  # over the limit, under PIL's own 2x error
        Image.new("RGB", (20, 20)).save(tmp_path / "ok.png")
        rows = write_jsonl(tmp_path / "i.jsonl", [{"messages": [{"role": "user", "content": "<image>?"},
                                                                {"role": "assistant", "content": "x"}],
                                                   "images": [str(tmp_path / name)]} for name in ("big.png", "ok.png")])
        loaded = load_datasets([rows], strict=False)
    finally:
        Image.MAX_IMAGE_PIXELS = old
    assert loaded.dropped == 1 and "megapixels" in loaded.reasons[0] and "i.jsonl:1" in loaded.reasons[0]


def test_a_vision_reward_model_loads_the_base_and_scores_the_last_token_with_its_picture(tiny_vl_models, tmp_path):
    """models.vision.sequence_classifier over Qwen-VL (transformers has none): every weight of the base checkpoint is
    loaded (only `score` is new); a pair's scores equal an independent computation — the generation model's final
    hidden state at the last real token (with the picture's pixels) through the score weight — padded or packed
    (rm.sequence_rewards); a different picture changes the score; and it saves ms-swift's seq_cls layout
    (architectures Qwen2_5_VLForSequenceClassification, `score.weight`, no lm_head) that loads back unchanged."""
    import json

    from safetensors import safe_open
    from transformers import AutoConfig

    from tunesmith.data.collate import pad_collate
    from tunesmith.data.encode import ChatEncoder
    from tunesmith.data.vision import with_pixels
    from tunesmith.models.vision import sequence_classifier
    from tunesmith.train.methods.pairs import Pair, PackedPairCollate
    from tunesmith.train.methods.rm import sequence_rewards, _collate_pairs

    model_dir = tiny_vl_models("qwen2_5_vl")
    cls = sequence_classifier(AutoConfig.from_pretrained(model_dir))
    torch.manual_seed(3)
    rm, info = cls.from_pretrained(model_dir, num_labels=1, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["score.weight"] and not info["unexpected_keys"]
    tok, spec = _spec(model_dir)
    rm.config.pad_token_id = rm.config.get_text_config().pad_token_id = tok.pad_token_id
    rm.eval()
    rows = colour_rows(tmp_path / "pics", 3, seed=4)
    enc = ChatEncoder(tok, images=spec)
    seqs = [enc.encode(r) for r in rows]
    pairs = [Pair(seqs[0], seqs[1]), Pair(seqs[2], seqs[0])]
    with torch.no_grad():
        padded = sequence_rewards(rm, with_pixels(lambda p: _collate_pairs(p, tok.pad_token_id), spec)(pairs))
        packed = sequence_rewards(rm, with_pixels(PackedPairCollate(tok.pad_token_id), spec)([pairs]))
        gen = _model(model_dir)
        gen.model.load_state_dict(rm.model.state_dict())
        expected = []
        for s in [seqs[0], seqs[2], seqs[1], seqs[0]]:
            batch = with_pixels(lambda r: pad_collate(r, tok.pad_token_id), spec)([s])
            h = gen.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                          image_grid_thw=batch["image_grid_thw"],
                          mm_token_type_ids=(batch["input_ids"] == gen.config.image_token_id).int()
                          ).last_hidden_state[0, -1]
            expected.append(float(h @ rm.score.weight[0]))
        other = with_pixels(lambda r: pad_collate(r, tok.pad_token_id), spec)([seqs[0]])
        other["pixel_values"] = torch.zeros_like(other["pixel_values"])  # the same tokens, a grey picture
        moved = rm(input_ids=other["input_ids"], pixel_values=other["pixel_values"],
                   image_grid_thw=other["image_grid_thw"],
                   mm_token_type_ids=(other["input_ids"] == gen.config.image_token_id).int()).logits[0, 0]
    assert torch.allclose(padded, torch.tensor(expected), atol=1e-5), (padded, expected)
    assert torch.allclose(packed, padded, atol=1e-5)
    assert abs(float(moved) - expected[0]) > 1e-4
    rm.save_pretrained(tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "score.weight" in keys and not any(k.startswith("lm_head") for k in keys)
    assert any(k.startswith("visual.") for k in keys) and any(k.startswith("model.layers.") for k in keys)
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["architectures"] == ["Qwen2_5_VLForSequenceClassification"]
    again, info = cls.from_pretrained(tmp_path / "saved", output_loading_info=True)
    assert not info["missing_keys"] and torch.equal(again.score.weight, rm.score.weight)


@pytest.mark.slow
def test_reward_model_on_image_pairs_learns_the_picture_and_scores_grpo_rollouts(tiny_vl_models, tmp_path):
    """`--rlhf_type rm` on a Qwen2.5-VL model, pairs sharing their picture (the right colour chosen, the next one
    rejected, cyclically, so no text-only scorer can order more than 2/3 of them): training accuracy reaches 0.95
    (measured 1.0), held-out pictures are ordered right by the saved checkpoint as GRPO's --reward_model scorer
    (measured 12/12 of 12), and GRPO runs with it as its reward, logging rewards/reward_model."""
    import json

    from tunesmith.train.methods.rm import RewardModelScorer

    model_dir = tiny_vl_models("qwen2_5_vl")
    data = write_jsonl(tmp_path / "rm.jsonl", _pairs(colour_rows(tmp_path / "pics", 48, seed=2)))
    res = train("rlhf", "--rlhf_type", "rm", "--model", model_dir, "--dataset", data, "--train_type", "full",
                "--learning_rate", "1e-3", "--max_steps", "24", "--per_device_train_batch_size", "8",
                "--logging_steps", "4", "--output_dir", tmp_path / "out", "--report_to", "none")
    log = [r for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "rewards/accuracies" in r]
    assert log[-1]["rewards/accuracies"] >= 0.95, log[-1]
    ckpt = os.path.join(res["run_dir"], "checkpoint-24")
    held_out = _pairs(colour_rows(tmp_path / "held", 12, seed=9))
    scorer = RewardModelScorer(ckpt)
    convs = [r["messages"][:1] + [{"role": "assistant", "content": c}]
             for r in held_out for c in (r["messages"][1]["content"], r["rejected_response"])]
    scores = scorer([c[-1]["content"] for c in convs], messages=convs,
                    images=[r["images"] for r in held_out for _ in range(2)])
    right = sum(scores[2 * i] > scores[2 * i + 1] for i in range(len(held_out)))
    assert right >= 11, (right, scores)
    # the budget it was trained with (args.json's image_pixels) is the one it scores with; a completion writing an
    # image tag itself, which no picture fills, gets no reward (None) instead of stopping the run
    args = json.loads(open(os.path.join(ckpt, "args.json"), encoding="utf-8").read())
    assert args["image_pixels"] == scorer.encoder.images.limits
    odd = scorer(["red", "see <image> here"], messages=convs[:1] + [convs[0][:1] + [
        {"role": "assistant", "content": "see <image> here"}]], images=[held_out[0]["images"]] * 2)
    assert odd[0] == pytest.approx(scores[0], abs=1e-5) and odd[1] is None
    prompts = [{"messages": [r["messages"][0]], "images": r["images"]} for r in held_out]
    res = train("rlhf", "--rlhf_type", "grpo", "--model", model_dir, "--reward_model", ckpt,
                "--dataset", write_jsonl(tmp_path / "p.jsonl", prompts), "--num_generations", "4",
                "--per_device_train_batch_size", "8", "--max_completion_length", "4", "--max_steps", "1",
                "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--output_dir", tmp_path / "g")
    rec = [r for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "reward" in r][0]
    assert "rewards/reward_model/mean" in rec


def test_pairs_with_their_own_rejected_pictures_encode(tiny_vl_models, tmp_path):
    """A pair whose rejected side has pictures of its own (`rejected_images`) is a preference through its pictures:
    the same reply on another picture, or another number of pictures (prompts that tokenise differently), encodes —
    a pair sharing its picture still needs replies that differ."""
    from tunesmith.data.encode import ChatEncoder
    from tunesmith.errors import DataError

    tok, spec = _spec(tiny_vl_models("qwen2_5_vl"))
    enc = ChatEncoder(tok, images=spec)
    red, blue = (r["images"][0] for r in colour_rows(tmp_path / "pics", 2, seed=11, sizes=((56, 56), (84, 56))))
    msgs = [{"role": "user", "content": "<image>What colour is this?"}, {"role": "assistant", "content": "red"}]
    same_reply = {"messages": msgs, "rejected_messages": msgs, "images": [red], "rejected_images": [blue]}
    chosen, rejected = enc.encode_pair(same_reply)
    assert chosen.images == [red] and rejected.images == [blue]
    two = [{"role": "user", "content": "<image><image>Which colours?"}, {"role": "assistant", "content": "red"}]
    one = [{"role": "user", "content": "<image>Which colours?"}, {"role": "assistant", "content": "red"}]
    chosen, rejected = enc.encode_pair({"messages": two, "rejected_messages": one, "images": [red, blue],
                                        "rejected_images": [blue]})
    assert len(chosen.images) == 2 and len(rejected.images) == 1
    with pytest.raises(DataError, match="same trained reply"):
        enc.encode_pair({"messages": msgs, "rejected_messages": msgs, "images": [red]})


@pytest.mark.slow
def test_full_training_of_a_vision_model_resumes_exactly(tiny_vl_models, tmp_path):
    """--train_type full on a Qwen2.5-VL model, resumed from checkpoint-2: transformers saves its weights in the
    checkpoints' original layout (`visual.*`, `model.layers.*`), which the resume reads back through transformers'
    own conversion; steps 3-4 equal the uninterrupted run's (loss and grad_norm)."""
    data = write_jsonl(tmp_path / "c.jsonl", colour_rows(tmp_path / "pics", 16, seed=5))
    flags = ["--model", tiny_vl_models("qwen2_5_vl"), "--dataset", data, "--train_type", "full", "--max_steps", "4",
             "--save_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--report_to", "none"]
    whole = train("sft", *flags, "--output_dir", tmp_path / "a")
    ckpt = os.path.join(whole["run_dir"], "checkpoint-2")
    resumed = train("sft", *flags, "--output_dir", tmp_path / "b", "--resume_from_checkpoint", ckpt)

    def steps(res):
        return {r["global_step/max_steps"]: (r["loss"], r["grad_norm"])
                for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "loss" in r}

    a, b = steps(whole), steps(resumed)
    for k in ("3/4", "4/4"):
        assert b[k] == pytest.approx(a[k], abs=1e-6), (k, a, b)
