"""A disk that refuses a checkpoint mid-run, as torch and safetensors report it (a RuntimeError with no errno:
`unexpected pos`, `basic_ios::clear: iostream error`) and as a real 2 MiB disk does: one message naming the file,
why, and the last good checkpoint; nothing half-written looks like a checkpoint."""
import errno
import json
import os

import pytest

from conftest import mounted_tmpfs, write_jsonl
from tunesmith.config.parser import parse_args
from tunesmith.errors import TunesmithError
from tunesmith.files import failed_write

TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 456"
TORCH_IOS = "basic_ios::clear: iostream error"


def _data(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in "red blue green black white gold pink gray".split()]
    return write_jsonl(tmp_path / "d.jsonl", rows)


def _sft(argv):
    from tunesmith.train import recipe
    return recipe.main(parse_args("sft", argv))


@pytest.mark.parametrize("text,code", [
    (TORCH_FULL, errno.ENOSPC), (TORCH_IOS, errno.ENOSPC),
    ("Error while serializing: I/O error: No space left on device (os error 28)", errno.ENOSPC),
    ("Error while serializing: I/O error: Disk quota exceeded (os error 122)", errno.EDQUOT),
    ("I/O error: Read-only file system (os error 30)", errno.EROFS)])
def test_disk_wordings_of_torch_and_safetensors_are_failed_writes(tmp_path, monkeypatch, text, code):
    """Each wording becomes an OSError naming the checkpoint; without an errno in the text, a disk under
    FULL_BELOW free is full."""
    import tunesmith.files as files

    monkeypatch.setattr(files, "FULL_BELOW", 1 << 62)
    e = failed_write(RuntimeError(text), "/x/checkpoint-2", str(tmp_path))
    assert (e.errno, e.filename) == (code, "/x/checkpoint-2")
    assert failed_write(ValueError("shapes do not match"), "/x/checkpoint-2") is None


def test_disk_with_room_left_names_torch_words_not_a_full_disk(tmp_path):
    e = failed_write(RuntimeError(TORCH_IOS), "/x/checkpoint-2", str(tmp_path))
    assert e.errno == errno.EIO and TORCH_IOS in e.strerror


@pytest.mark.slow
@pytest.mark.parametrize("text,full", [(TORCH_FULL, True), (TORCH_IOS, False)])
def test_disk_refusing_torch_save_mid_run_is_one_message(tiny_models, tmp_path, monkeypatch, text, full):
    """torch.save of checkpoint-2's optimiser raises torch's own words: with the disk (nearly) full the message
    says so; with room left it says the write failed, in torch's words. Either way it names checkpoint-2, the last
    good checkpoint-1 (complete), and leaves no partial folder."""
    import torch

    import tunesmith.files as files

    real = torch.save

    def save(obj, f, *a, **k):
        if "checkpoint-2" in str(f) and str(f).endswith("optimizer.pt"):
            raise RuntimeError(text)
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    if full:
        monkeypatch.setattr(files, "FULL_BELOW", 1 << 62)
    out = tmp_path / "out"
    with pytest.raises(TunesmithError) as e:
        _sft(["--model", tiny_models("qwen2"), "--dataset", _data(tmp_path), "--report_to", "none", "--max_steps",
              "4", "--save_steps", "1", "--per_device_train_batch_size", "4", "--output_dir", str(out)])
    run_dir = next(out.iterdir())
    msg = str(e.value)
    why = "the disk is full" if full else f"the write failed (RuntimeError: {TORCH_IOS}) with room left on the disk"
    assert msg.startswith(f"could not write a checkpoint ({run_dir / 'checkpoint-2'}): {why}."), msg
    assert f"Last good checkpoint: {run_dir / 'checkpoint-1'}." in msg and \
        f"--resume_from_checkpoint {run_dir / 'checkpoint-1'}" in msg and "\n" not in msg, msg
    assert sorted(p.name for p in run_dir.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    assert (run_dir / "checkpoint-1" / "trainer_state.json").is_file()


@pytest.fixture
def tmpfs_2mib(tmp_path):
    """A real 2 MiB tmpfs."""
    with mounted_tmpfs(tmp_path / "small", "size=2m", "a tmpfs") as mnt:
        yield mnt


@pytest.mark.slow
def test_disk_of_2_mib_fills_mid_run_one_message_and_the_named_checkpoint_is_complete(tiny_models, tmp_path,
                                                                                      tmpfs_2mib):
    """LoRA checkpoints every step on a 2 MiB disk: the run stops at the save that does not fit with one message
    naming the disk as full and the last good checkpoint, which is complete; no partial save is left."""
    with pytest.raises(TunesmithError) as e:
        _sft(["--model", tiny_models("qwen2"), "--dataset", _data(tmp_path), "--report_to", "none", "--max_steps",
              "40", "--save_steps", "1", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
              "--output_dir", str(tmpfs_2mib / "out")])
    msg = str(e.value)
    assert msg.startswith("could not write ") and ": the disk is full." in msg and "\n" not in msg, msg
    good = msg.split("Last good checkpoint: ", 1)[1].split(". ", 1)[0]
    assert os.path.basename(good).startswith("checkpoint-") and f"--resume_from_checkpoint {good}" in msg
    with open(os.path.join(good, "trainer_state.json"), encoding="utf-8") as fh:
        assert json.load(fh)["global_step"] == int(good.rsplit("-", 1)[1])
    run_dir = os.path.dirname(good)
    assert not [n for n in os.listdir(run_dir) if n.startswith(".tmp-")]
