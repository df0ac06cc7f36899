"""What a checkpoint passes on (models/checkpoint.resolve_checkpoint, runs/run_dir.save_args): every setting that
shapes the prompt follows the model into infer, deploy, eval and a merged export (flags given win), and the base
model an args.json records opens from any directory — or a clear message says it is gone."""
import json
import os
import shutil

import pytest
from conftest import EXAMPLES

from tunesmith.config.parser import given_flags, parse_args
from tunesmith.errors import ConfigError
from tunesmith.models.checkpoint import resolve_checkpoint

CAPITALS = os.path.join(EXAMPLES, "capitals_messages.jsonl")
NO_THINK = "<|im_start|>assistant\n<think>\n\n</think>\n\n"  # Qwen3's generation prompt with enable_thinking false
HELLO = [{"role": "user", "content": "Hello"}]


def _json(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _adapter(folder, **saved):
    """A folder that looks like a LoRA checkpoint, with `saved` as its args.json; returns its path as a string."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "adapter_config.json"), "w", encoding="utf-8") as fh:
        json.dump({"peft_type": "LORA"}, fh)
    with open(os.path.join(folder, "args.json"), "w", encoding="utf-8") as fh:
        json.dump(saved, fh)
    return str(folder)


# ------------------------------------------------------------------ which flags were given

def test_given_flags_are_recorded_even_at_their_defaults(tmp_path):
    config = tmp_path / "infer.yaml"
    config.write_text("max_new_tokens: 8\n", encoding="utf-8")
    args = parse_args("infer", [str(config), "--truncation_strategy", "delete", "--enable_thinking", "true"])
    assert {"truncation_strategy", "enable_thinking", "max_new_tokens"} <= given_flags(args)
    assert "use_chat_template" not in given_flags(args) and "model" not in given_flags(args)
    assert "truncation_strategy" not in given_flags(parse_args("infer", []))


def test_prompt_settings_follow_the_checkpoint_unless_given(tmp_path, tiny_models):
    ckpt = _adapter(tmp_path / "ckpt", model=tiny_models("qwen3"), enable_thinking=False, template="qwen3",
                    truncation_strategy="left", use_chat_template=True, system="Be brief.")
    args, found = resolve_checkpoint(parse_args("infer", ["--adapters", ckpt]))
    assert found == ckpt
    assert (args.enable_thinking, args.template, args.truncation_strategy, args.system) == \
        (False, "qwen3", "left", "Be brief.")
    # flags given win, even when they equal the default (ms-swift's rule)
    args, _ = resolve_checkpoint(parse_args("deploy", ["--adapters", ckpt, "--enable_thinking", "true",
                                                       "--truncation_strategy", "delete", "--system", "Hi."]))
    assert (args.enable_thinking, args.truncation_strategy, args.system) == (True, "delete", "Hi.")
    # --load_args false: nothing from the checkpoint
    args, _ = resolve_checkpoint(parse_args("eval", ["--adapters", ckpt, "--model", tiny_models("qwen3"),
                                                     "--load_args", "false"]))
    assert args.enable_thinking is None and args.system is None


# ------------------------------------------------------------------ the base model's path

def test_args_json_records_local_model_paths_absolute(tmp_path, monkeypatch):
    from tunesmith.runs.run_dir import save_args

    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    record = save_args(str(tmp_path), parse_args("sft", ["--model", "base", "--adapters", "base",
                                                         "--dataset", "data.jsonl"]))
    assert record["model"] == str(tmp_path / "base") and record["adapters"] == [str(tmp_path / "base")]
    assert record["dataset"] == ["data.jsonl"] and record["working_dir"] == str(tmp_path)  # kept as given
    record = save_args(str(tmp_path), parse_args("sft", ["--model", "Qwen/Qwen3-0.6B"]))
    assert record["model"] == "Qwen/Qwen3-0.6B"  # a hub id
    # args.json's record-only keys read back as a config file
    assert parse_args("sft", [str(tmp_path / "args.json")]).model == "Qwen/Qwen3-0.6B"


def test_a_relative_base_model_in_an_older_args_json_is_found_again(tmp_path, monkeypatch):
    base = tmp_path / "a" / "models" / "base"
    base.mkdir(parents=True)
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    # an older args.json: the path as written, and model_dir, the folder training resolved it to
    old = _adapter(tmp_path / "old", model="models/base", model_dir=str(base))
    assert resolve_checkpoint(parse_args("infer", ["--adapters", old]))[0].model == str(base)
    new = _adapter(tmp_path / "new", model="models/base", working_dir=str(tmp_path / "a"))
    assert resolve_checkpoint(parse_args("export", ["--adapters", new]))[0].model == str(base)
    # hub ids stay hub ids (their model_dir is a hub cache's folder)
    for saved in ({"model": "Qwen/Qwen3-0.6B", "model_dir": "/root/.cache/modelscope/hub/models/Qwen/Qwen3-0.6B"},
                  {"model": "Qwen/Qwen3-0.6B", "working_dir": str(tmp_path / "a")}):
        hub = _adapter(tmp_path / "hub", **saved)
        assert resolve_checkpoint(parse_args("infer", ["--adapters", hub]))[0].model == "Qwen/Qwen3-0.6B"


@pytest.mark.parametrize("saved", [{"model": "/gone/models/base"},
                                   {"model": "models/base", "model_dir": "/gone/models/base"},
                                   {"model": "./base", "working_dir": "/gone"}])
def test_a_missing_recorded_base_model_is_one_clear_message(tmp_path, monkeypatch, capsys, saved):
    import huggingface_hub

    from tunesmith.cli import main

    def no_hub(*a, **k):
        raise AssertionError("a hub download was tried")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    ckpt = _adapter(tmp_path / "ckpt", **saved)
    with pytest.raises(ConfigError, match=r"ckpt/args.json: the base model folder it records, .*base.* was not "
                                          r"found .*pass --model"):
        resolve_checkpoint(parse_args("infer", ["--adapters", ckpt]))
    assert main(["export", "--adapters", ckpt, "--merge_lora", "true"]) == 1
    err = capsys.readouterr().err
    assert "was not found" in err and "--model" in err and "download" not in err and "Traceback" not in err
    # the base model named on the command line is used instead
    args, _ = resolve_checkpoint(parse_args("infer", ["--adapters", ckpt, "--model", str(tmp_path)]))
    assert args.model == str(tmp_path)


# ------------------------------------------------------------------ a real run: Qwen3 no-think SFT

@pytest.fixture(scope="module")
def no_think(tiny_models, tmp_path_factory):
    """A Qwen3 LoRA trained with --enable_thinking false and a relative --model, in its own directory:
    (the directory training ran in, the checkpoint)."""
    from tunesmith.train import recipe

    here = tmp_path_factory.mktemp("train_here")
    shutil.copytree(tiny_models("qwen3"), here / "base")
    cwd = os.getcwd()
    os.chdir(here)
    try:
        res = recipe.main(parse_args("sft", ["--model", "base", "--dataset", CAPITALS, "--max_steps", "2",
                                             "--per_device_train_batch_size", "2", "--gradient_accumulation_steps",
                                             "1", "--output_dir", "out", "--report_to", "none",
                                             "--enable_thinking", "false"]))
    finally:
        os.chdir(cwd)
    return here, os.path.join(str(here), res["state"].last_model_checkpoint)


def _rendered(argv):
    """(the engine's template kwargs, its rendered prompt for HELLO) for an infer/deploy command line."""
    from tunesmith.inference.chat import build_engine

    command, *flags = argv
    engine = build_engine(parse_args(command, flags))[0]
    try:
        return engine.template_kwargs, engine.tok.decode(engine.prompt(HELLO).ids)
    finally:
        engine.close()


@pytest.mark.slow
def test_a_no_think_checkpoint_is_served_no_think_from_anywhere(no_think, tmp_path, monkeypatch, capsys):
    here, ckpt = no_think
    saved = _json(os.path.join(ckpt, "args.json"))
    assert saved["enable_thinking"] is False and saved["model"] == str(here / "base")
    monkeypatch.chdir(tmp_path)  # elsewhere: the relative --model training was given resolves from here too
    for command in ("infer", "deploy"):
        kwargs, text = _rendered([command, "--adapters", ckpt])
        assert kwargs == {"enable_thinking": False} and text.endswith(NO_THINK)
    assert "enable_thinking=False" in capsys.readouterr().err  # said what it inherited
    # a flag given wins
    kwargs, text = _rendered(["infer", "--adapters", ckpt, "--enable_thinking", "true"])
    assert kwargs == {"enable_thinking": True} and not text.endswith(NO_THINK)
    # the run folder moved: the adapter is found where it is now, the base model where it was recorded
    moved = tmp_path / "moved"
    shutil.copytree(os.path.dirname(ckpt), moved)
    kwargs, text = _rendered(["deploy", "--adapters", str(moved / os.path.basename(ckpt))])
    assert kwargs == {"enable_thinking": False} and text.endswith(NO_THINK)


@pytest.mark.slow
def test_a_merged_no_think_model_keeps_its_settings(no_think, tmp_path, monkeypatch):
    from tunesmith.cli import main

    _, ckpt = no_think
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--adapters", ckpt, "--merge_lora", "true", "--output_dir", "merged"]) == 0
    saved = _json(tmp_path / "merged" / "args.json")
    assert saved["enable_thinking"] is False and saved["model"] == str(tmp_path / "merged")
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    kwargs, text = _rendered(["infer", "--model", str(tmp_path / "merged")])
    assert kwargs == {"enable_thinking": False} and text.endswith(NO_THINK)
    assert _rendered(["deploy", "--model", str(tmp_path / "merged"), "--enable_thinking", "true"])[0] == \
        {"enable_thinking": True}


def test_settings_equal_to_the_commands_own_are_not_announced_as_inherited(tmp_path, capsys):
    """A plain LoRA checkpoint's args.json holds the quantisation defaults (bnb_4bit_quant_type nf4, ...): they
    equal infer's own, so nothing is said about them; what differs (the base model) is."""
    from tunesmith.models.checkpoint import resolve_checkpoint

    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "base", "task_type": "CAUSAL_LM"}))
    defaults = parse_args("infer", [])
    (ckpt / "args.json").write_text(json.dumps({"model": "Qwen/Qwen2.5-0.5B", "bnb_4bit_quant_type":
                                                defaults.bnb_4bit_quant_type, "bnb_4bit_use_double_quant":
                                                defaults.bnb_4bit_use_double_quant}))
    args, _ = resolve_checkpoint(parse_args("infer", ["--adapters", str(ckpt)]))
    said = capsys.readouterr().err
    assert args.model == "Qwen/Qwen2.5-0.5B" and "model='Qwen/Qwen2.5-0.5B'" in said and "bnb_4bit" not in said
