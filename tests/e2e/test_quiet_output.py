"""What a user sees from a plain run: the commands' own lines only. No library warning, deprecation, progress bar
or log line that the user cannot act on (tunesmith.cli.quiet_libraries and LIBRARY_NOISE stop each at its
source), and no traceback."""
import os
import subprocess
import sys

import pytest

from conftest import EXAMPLES, HANG_S, REPO

# what must never reach a user from a plain run: warnings (FutureWarning, DeprecationWarning, UserWarning, ...),
# deprecation notices, tracebacks, transformers' progress bars and DeepSpeed's log line on a CPU machine
NOISE = ("warning", "deprecat", "traceback", "loading weights", "writing model shards", "setting accelerator")


def _tunesmith(*argv):
    """`tunesmith ARGV` as a user runs it (the interpreter's default warning filters, no PYTHONWARNINGS):
    (stdout, stderr); asserts it exits 0."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run([sys.executable, "-m", "tunesmith", *argv], capture_output=True, text=True, env=env,
                       timeout=HANG_S)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout, p.stderr


def _noise(text):
    return [line for line in text.splitlines() if any(word in line.lower() for word in NOISE)]


@pytest.mark.slow
def test_sft_export_and_infer_print_no_library_noise(tiny_models, tmp_path):
    """A short LoRA sft (gradient checkpointing on: peft's read of a deprecated transformers name), its merge and
    inference on the merged model: neither stream holds a warning, a deprecation, a traceback, transformers'
    "Loading weights"/"Writing model shards" bars or DeepSpeed's "Setting accelerator to CPU" (DeepSpeed is
    installed in the test environment, and transformers' save_pretrained imports it)."""
    model = tiny_models("qwen2")
    out = tmp_path / "sft"
    runs = [_tunesmith("sft", "--model", model, "--dataset", os.path.join(EXAMPLES, "capitals_messages.jsonl"),
                       "--train_type", "lora", "--max_steps", "2", "--save_steps", "2", "--report_to", "none",
                       "--per_device_train_batch_size", "4", "--gradient_checkpointing", "true",
                       "--output_dir", str(out))]
    (run_dir,) = out.iterdir()
    ckpt = run_dir / "checkpoint-2"
    runs.append(_tunesmith("export", "--adapters", str(ckpt), "--merge_lora", "true"))
    runs.append(_tunesmith("infer", "--model", f"{ckpt}-merged", "--val_dataset",
                           os.path.join(EXAMPLES, "questions.jsonl"), "--max_new_tokens", "4", "--temperature", "0",
                           "--result_path", str(tmp_path / "result.jsonl")))
    for stdout, stderr in runs:
        assert not _noise(stdout) and not _noise(stderr), (stdout[-2000:], stderr[-2000:])
    assert (tmp_path / "result.jsonl").is_file()
