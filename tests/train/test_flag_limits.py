"""Training flags whose values cannot run, found before anything loads (exit 2, one line naming the flag, the value
and the fix): counts so large they overflow or never finish, and an --output_dir on a read-only file system."""
import pytest

from conftest import cli_error, write_jsonl

GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}




@pytest.mark.parametrize("flag,value,fragment", [
    ("gradient_accumulation_steps", "99999999999999999999999", "expected at most 2147483647; a count this large "
                                                               "would never finish"),
    ("num_train_epochs", "1e308", "expected 0 < num_train_epochs <= 1000000; or give --max_steps N"),
    ("num_train_epochs", "inf", "expected 0 < num_train_epochs <= 1000000"),
    ("max_steps", "9223372036854775808", "expected at most 2147483647"),
    ("per_device_train_batch_size", "4294967296", "expected at most 2147483647"),
    ("save_steps", "99999999999999999999", "expected at most 2147483647"),
    ("max_length", "99999999999999999999", "expected at most 2147483647"),
])
def test_counts_too_large_to_run_are_flag_problems(tiny_models, tmp_path, capsys, flag, value, fragment):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    rc, msg = cli_error(capsys, "sft", "--model", tiny_models("qwen2"), "--dataset", data, f"--{flag}", value,
                     "--output_dir", tmp_path / "o")
    assert rc == 2 and f"--{flag} " in msg and fragment in msg, msg
    assert not (tmp_path / "o").exists()


def test_an_output_dir_on_a_read_only_file_system_says_so(tiny_models, tmp_path, capsys, read_only_dir):
    """EROFS is a read-only file system, named with its path, not a permissions problem."""
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    rc, msg = cli_error(capsys, "sft", "--model", tiny_models("qwen2"), "--dataset", data,
                     "--output_dir", read_only_dir / "out")
    assert rc == 2 and f"--output_dir {read_only_dir / 'out'}: {read_only_dir} is on a read-only file system" in msg
    assert "permission" not in msg, msg


def test_a_mid_run_write_on_a_read_only_file_system_says_so():
    """The mid-run message (interrupts.disk_error) for EROFS names the path and the file system."""
    import errno

    from tunesmith.train.checkpoint import TrainState
    from tunesmith.train.interrupts import disk_error

    msg = str(disk_error(OSError(errno.EROFS, "Read-only file system", "/mnt/out/v0/logging.jsonl"),
                         TrainState(global_step=3, good_checkpoint="/mnt/out/v0/checkpoint-2")))
    assert msg.startswith("could not write the training log (/mnt/out/v0/logging.jsonl): the file system is "
                          "read-only.") and "Remount it writable" in msg and "permission" not in msg, msg
