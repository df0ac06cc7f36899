"""A local --model folder that cannot be a model: empty (transformers would ask to install sentencepiece), without
config.json, or not readable by this user (the folder, or its weights file). One line naming the folder or file and
the fix, exit 2 before anything loads; never a traceback, never a hub download."""
import os
import shutil

import pytest

from conftest import as_other_user, cli_error, write_jsonl

GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}




@pytest.mark.parametrize("content", ["empty", "no_config"])
def test_a_model_folder_without_a_model_is_a_flag_problem(tmp_path, capsys, content):
    model = tmp_path / "model"
    model.mkdir()
    if content == "no_config":
        (model / "tokenizer.json").write_text("{}")
    why = "the folder is empty" if content == "empty" else "no config.json in it, so it is not a Hugging Face model"
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    for command, argv in (("sft", ["--dataset", data, "--output_dir", tmp_path / "o"]),
                          ("infer", ["--val_dataset", data]), ("deploy", [])):
        rc, msg = cli_error(capsys, command, "--model", model, *argv)
        assert rc == 2 and f"--model {model}: {why}" in msg and "sentencepiece" not in msg, msg
    assert not (tmp_path / "o").exists()


def test_resolving_a_model_folder_without_a_model_is_one_error(tmp_path):
    """Where a model folder is resolved without the flag checks first (a --ref_model, a --reward_model)."""
    from tunesmith.errors import ConfigError
    from tunesmith.models.load import resolve_model_dir
    with pytest.raises(ConfigError, match="the folder is empty"):
        resolve_model_dir(str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("locked", ["folder", "weights"])
def test_a_model_this_user_cannot_read_is_a_flag_problem(tiny_models, shared_dir, locked):
    """Run as another user (root reads everything): a model folder, or its weights file, without read permission
    is named with the fix — before anything loads, with exit 2."""
    model = os.path.join(shared_dir, "model")
    shutil.copytree(tiny_models("qwen2"), model)
    os.chmod(shared_dir, 0o777)
    for dirpath, dirs, files in os.walk(model):
        os.chmod(dirpath, 0o755)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)
    target = model if locked == "folder" else os.path.join(model, "model.safetensors")
    os.chmod(target, 0o700 if locked == "folder" else 0o600)
    data = write_jsonl(os.path.join(shared_dir, "d.jsonl"), [GOOD])
    os.chmod(data, 0o644)
    cache = os.path.join(shared_dir, "cache")
    os.makedirs(cache, mode=0o777)
    os.chmod(cache, 0o777)
    for argv in (["sft", "--model", model, "--dataset", data, "--output_dir", os.path.join(shared_dir, "o")],
                 ["infer", "--model", model, "--val_dataset", data]):
        p = as_other_user(argv, HF_DATASETS_CACHE=cache)
        lines = [line for line in p.stderr.splitlines() if "error:" in line]
        assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
        assert f"--model {model}: {target} cannot be read by this user (permission denied); fix the permissions" \
            in lines[0], lines[0]
    assert not os.path.exists(os.path.join(shared_dir, "o"))
