"""--log_completions with --report_to wandb: GRPO's and GKD's completions reach W&B as ms-swift's `completions` table,
one table per logging step (step, prompt, completion, each reward, advantages), de-duplicated by prompt with
--wandb_log_unique_prompts true; completions.jsonl and the other trackers are unchanged, and without W&B nothing
is held. The runs use W&B's offline mode (WANDB_MODE=offline, its directories under tmp_path), so nothing touches
the network: each logged table is read back from the offline run's files (files/media/table/*.table.json, W&B's own
serialisation of the table it would upload). wandb is in the [test] extra; where it is not installed these runs are
skipped."""
import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import read_jsonl, train, write_jsonl
from tunesmith.runs.track import CompletionRows, Trackers
from fakes import EVEN_TOKENS_PLUGIN

NO_WANDB = "wandb is not installed (pip install 'tunesmith[wandb]', or the [test] extra)"

pytestmark = pytest.mark.usefixtures("no_charts")

@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """wandb importable, in its offline mode, with its config, cache and data folders in tmp_path."""
    pytest.importorskip("wandb", reason=NO_WANDB)
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_CONFIG_DIR": tmp_path / "wandb-config", "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
                       "WANDB_DATA_DIR": tmp_path / "wandb-data", "WANDB_PROJECT": "tunesmith-test"}.items():
        monkeypatch.setenv(var, str(value))
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)


def _tables(run_dir):
    """The completions tables the offline W&B run holds, in step order: [(columns, rows)]."""
    paths = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "files", "media", "table",
                                   "completions_*.table.json"))
    tables = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            t = json.load(fh)
        tables.append((t["columns"], t["data"]))
    return sorted(tables, key=lambda t: int(t[1][0][0]))


def _grpo(tiny_models, tmp_path, out, *flags):
    data = write_jsonl(tmp_path / "prompts.jsonl", [
        {"messages": [{"role": "user", "content": f"say something {i}"}], "solution": f"s{i}"} for i in range(8)])
    plugin = tmp_path / "plugin.py"
    plugin.write_text(EVEN_TOKENS_PLUGIN)
    return train("rlhf", "--rlhf_type", "grpo", "--model", tiny_models("qwen2"), "--dataset", data,
                 "--num_generations", "4", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
                 "--max_completion_length", "6", "--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no",
                 "--external_plugins", plugin, "--reward_funcs", "even_tokens", "format",
                 "--log_completions", "true", "--output_dir", out, *flags)


# ------------------------------------------------------------------ the table's rows (no wandb needed)

def test_grpo_rows_stay_until_the_next_round_and_gkd_rows_are_taken_once():
    rows = [{"prompt": "a", "completion": "x", "r": 1.0}, {"prompt": "a", "completion": "y", "r": None},
            {"prompt": "b", "completion": "z", "r": 0.5}]
    grpo = CompletionRows()
    grpo.hold(rows, latest_round=True)
    assert grpo.take(4) == (["step", "prompt", "completion", "r"],
                            [["4", "a", "x", 1.0], ["4", "a", "y", None], ["4", "b", "z", 0.5]])
    assert grpo.take(5)[1][0] == ["5", "a", "x", 1.0]  # the last round again, as ms-swift's deque keeps it
    grpo.hold(rows[2:], latest_round=True)
    assert grpo.take(6)[1] == [["6", "b", "z", 0.5]]
    gkd = CompletionRows(unique_prompts=True)
    gkd.hold(rows[:2], latest_round=False)
    gkd.hold(rows[2:], latest_round=False)
    assert gkd.take(1)[1] == [["1", "a", "x", 1.0], ["1", "b", "z", 0.5]]  # each prompt's first row
    assert gkd.take(2) is None  # taken once (ms-swift clears GKD's rows when logged)


def test_without_wandb_nothing_is_held(tmp_path):
    trackers = Trackers(str(tmp_path), ["none"], {})
    trackers.hold_completions([{"prompt": "a", "completion": "x"}], latest_round=True)
    assert trackers.completions.rows == []
    trackers.log({"loss": 1.0, "global_step": 1}, 1, completions=True)
    assert read_jsonl(tmp_path / "logging.jsonl") == [{"loss": 1.0, "global_step": 1}]


def test_wandb_missing_is_the_usual_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    trackers = Trackers(str(tmp_path), ["wandb"], {})
    trackers.hold_completions([{"prompt": "a", "completion": "x"}], latest_round=True)
    trackers.log({"loss": 1.0, "global_step": 1}, 1, completions=True)
    assert "--report_to wandb: wandb is not installed (pip install 'tunesmith[wandb]'); metrics still go to " \
           "logging.jsonl" in capsys.readouterr().err
    assert trackers.active == {} and trackers.completions.rows == []


@pytest.mark.parametrize("flags,said", [
    (["--log_completions", "true", "--report_to", "wandb"], None),
    (["--log_completions", "true", "--report_to", "tensorboard"], "needs --report_to wandb: it changes nothing"),
    (["--report_to", "all"], "needs --log_completions true: it changes nothing"),
    (["--rlhf_type", "dpo"], "needs --rlhf_type grpo or gkd (not dpo) and --log_completions true and --report_to "
                             "wandb: it changes nothing here"),
])
def test_unique_prompts_without_a_table_is_said(tiny_models, tmp_path, capsys, flags, said):
    from tunesmith.config.parser import parse_args
    from tunesmith.train.config import check
    from tunesmith.train.recipe import method_for

    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "yo"}]}])
    args = parse_args("rlhf", ["--rlhf_type", "grpo", "--model", tiny_models("qwen2"), "--dataset", data,
                               "--reward_funcs", "format", "--output_dir", str(tmp_path / "out"),
                               "--wandb_log_unique_prompts", "true", *flags])
    check(args, method_for(args))
    err = capsys.readouterr().err
    assert (said in err) if said else "--wandb_log_unique_prompts" not in err, err


# ------------------------------------------------------------------ real runs, W&B offline

@pytest.mark.slow
def test_grpo_logs_each_steps_completions_as_a_wandb_table(offline_wandb, tiny_models, tmp_path):
    """Three steps, one round each (8 completions: 2 prompts x G 4): three tables, each the round's rows of
    completions.jsonl with ms-swift's columns; --report_to wandb among others changes nothing else."""
    res = _grpo(tiny_models, tmp_path, tmp_path / "wandb", "--report_to", "wandb", "tensorboard")
    run_dir = res["run_dir"]
    logged = read_jsonl(os.path.join(run_dir, "completions.jsonl"))
    tables = _tables(run_dir)
    names = list(logged[0]["rewards"])  # ms-swift's reward names: EvenTokens (the ORM's class), Format
    assert len(logged) == 3 * 8 and len(tables) == 3 and len(names) == 2
    for step, (columns, rows) in enumerate(tables, start=1):
        assert columns == ["step", "prompt", "completion", *names, "advantages", "solution"]
        round_ = [c for c in logged if c["round"] == step - 1]
        assert [r[0] for r in rows] == [str(step)] * 8
        assert [r[2] for r in rows] == [c["completion"] for c in round_]
        assert [r[3:5] for r in rows] == [[c["rewards"][n] for n in names] for c in round_]
        assert [r[5] for r in rows] == pytest.approx([c["advantage"] for c in round_])
        assert [r[1] for r in rows][::4] == [res["tokenizer"].apply_chat_template(
            c["prompt"], tokenize=False, add_generation_prompt=True) for c in round_[::4]]
        assert [r[6] for r in rows] == [f"s{c['prompt'][0]['content'].split()[-1]}" for c in round_]
    assert glob.glob(os.path.join(run_dir, "runs", "events.out.tfevents.*"))  # tensorboard still logs

    plain = _grpo(tiny_models, tmp_path, tmp_path / "plain", "--report_to", "tensorboard")
    assert read_jsonl(os.path.join(plain["run_dir"], "completions.jsonl")) == logged
    assert not os.path.exists(os.path.join(plain["run_dir"], "wandb"))


@pytest.mark.slow
def test_unique_prompts_keeps_each_prompts_first_completion(offline_wandb, tiny_models, tmp_path):
    res = _grpo(tiny_models, tmp_path, tmp_path / "out", "--report_to", "wandb", "--wandb_log_unique_prompts", "true",
                "--max_steps", "2")
    logged = read_jsonl(os.path.join(res["run_dir"], "completions.jsonl"))
    tables = _tables(res["run_dir"])
    assert len(logged) == 2 * 8 and len(tables) == 2
    for step, (_, rows) in enumerate(tables, start=1):
        firsts = [c for c in logged if c["round"] == step - 1][::4]  # G 4: each prompt's first completion
        assert [r[2] for r in rows] == [c["completion"] for c in firsts] and len({r[1] for r in rows}) == 2


@pytest.mark.slow
def test_gkd_logs_its_on_policy_completions_as_a_wandb_table(offline_wandb, tiny_models, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(8)]
    res = train("rlhf", "--rlhf_type", "gkd", "--model", tiny_models("qwen2"),
                "--teacher_model", tiny_models("qwen2", seed=1), "--dataset", write_jsonl(tmp_path / "t.jsonl", rows),
                "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--lmbda", "1",
                "--max_completion_length", "6", "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no",
                "--log_completions", "true", "--report_to", "wandb", "--output_dir", tmp_path / "gkd")
    logged = read_jsonl(os.path.join(res["run_dir"], "completions.jsonl"))
    tables = _tables(res["run_dir"])
    assert [columns for columns, _ in tables] == [["step", "prompt", "completion"]] * 2
    assert [row for _, rows in tables for row in rows] == [[str(c["step"]), c["prompt"], c["completion"]]
                                                           for c in logged]
    assert len(logged) == 2 * 4


@pytest.mark.slow
def test_no_token_reaches_the_wandb_run_files(offline_wandb, tiny_models, tmp_path):
    """W&B's system metadata records the process command line; it is switched off, so --hub_token and
    --swanlab_token given on the command line are in no file of the run (the table is still there)."""
    data = write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": f"say {i}"}]} for i in range(4)])
    token, swan = "hf_wandbTOKEN9f8e7d6c5b", "sk-swanlab-wandbTOKEN-1a2b3c"
    argv = [sys.executable, "-m", "tunesmith", "rlhf", "--rlhf_type", "grpo", "--model", tiny_models("qwen2"),
            "--dataset", data, "--num_generations", "4", "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "1", "--max_completion_length", "4", "--max_steps", "1",
            "--save_strategy", "no", "--reward_funcs", "format", "--log_completions", "true", "--report_to", "wandb",
            "--output_dir", str(tmp_path / "out"), "--hub_token", token, "--swanlab_token", swan]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "out" / "v0-*"))
    assert len(_tables(run_dir)) == 1
    for dirpath, _, files in os.walk(tmp_path):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                data = fh.read()
            assert token.encode() not in data and swan.encode() not in data, os.path.join(dirpath, f)
