"""--result_path that cannot be written (infer and deploy): a folder, a path under a file, a read-only file system.
One line naming the flag, the path and the fix, exit 2 before the model loads."""
import pytest

from conftest import write_jsonl
from tunesmith.cli import main

GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize("command", ["infer", "deploy"])
def test_a_result_path_that_cannot_be_written_is_a_flag_problem(tiny_models, tmp_path, capsys, read_only_dir,
                                                                command):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    cases = [(tmp_path, f"--result_path {tmp_path}: is a folder; give the file to write, e.g. "
                        f"{tmp_path / 'result.jsonl'}"),
             (tmp_path / "d.jsonl" / "r.jsonl", f"{data} is a file, so nothing can be created under it"),
             (read_only_dir / "r.jsonl", f"{read_only_dir} is on a read-only file system")]
    for path, fragment in cases:
        rc = main([command, "--model", tiny_models("qwen2"), "--result_path", str(path),
                   *(["--val_dataset", data] if command == "infer" else [])])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith(f"tunesmith {command}: error: ")]
        assert rc == 2 and len(lines) == 1 and fragment in lines[0] and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "ro"]  # nothing written
