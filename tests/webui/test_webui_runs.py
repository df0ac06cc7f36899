"""Run discovery: runs are folders found again on every refresh (a reload or a new page process lists the same
runs), a page's start is linked to the run folder it made, logs are read incrementally, and each run's state and
end message are those its files say."""
import dataclasses
import json
import os
import sys
import time

from tunesmith.webui import launch as L
from tunesmith.webui.runs import find_runs, link_launches, message_of, read_records, run_folders
from tunesmith.webui.runs_page import progress, resume_command, table


def _run(folder, steps=3, summary=False, args=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "args.json"), "w") as fh:
        json.dump(args or {"model": "m", "max_steps": steps}, fh)
    with open(os.path.join(folder, "logging.jsonl"), "w") as fh:
        for s in range(1, steps + 1):
            fh.write(json.dumps({"loss": 1.0 / s, "global_step": s, "global_step/max_steps": f"{s}/{steps}",
                                 "elapsed_time": "0:00:01", "remaining_time": "0:00:02"}) + "\n")
        if summary:
            fh.write(json.dumps({"global_step": steps, "train_runtime": 1.0}) + "\n")
    return str(folder)


def test_run_folders_are_found_at_any_depth_but_not_inside_runs(tmp_path):
    a = _run(tmp_path / "out" / "qwen" / "v0-20260101-000000", summary=True)
    b = _run(tmp_path / "out" / "deep" / "er" / "v3-20260101-000000")
    loading = tmp_path / "out" / "qwen" / "v1-20260102-000000"  # args.json, no log yet
    loading.mkdir()
    (loading / "args.json").write_text("{}")
    os.makedirs(os.path.join(a, "checkpoint-2"))
    with open(os.path.join(a, "checkpoint-2", "args.json"), "w") as fh:
        fh.write("{}")
    (tmp_path / "out" / ".hidden" / "v0-20260101-000000").mkdir(parents=True)
    (tmp_path / "out" / "merged").mkdir()
    (tmp_path / "out" / "merged" / "args.json").write_text("{}")  # an export: not a run
    found = run_folders([str(tmp_path / "out")])
    assert sorted(found) == sorted([a, b, str(loading)])


def test_logging_is_read_incrementally(tmp_path):
    path = tmp_path / "logging.jsonl"
    path.write_text(json.dumps({"loss": 1.0, "global_step": 1}) + "\n" + '{"loss": 0.5, "glo')
    assert [r["global_step"] for r in read_records(str(path))] == [1]  # the half-written line waits
    with open(path, "a") as fh:
        fh.write('bal_step": 2}\n' + json.dumps({"loss": 0.2, "global_step": 3}) + "\n")
    assert [r["global_step"] for r in read_records(str(path))] == [1, 2, 3]
    os.replace(_write(tmp_path / "new.jsonl", [{"global_step": 9}]), path)  # replaced: read afresh
    assert [r["global_step"] for r in read_records(str(path))] == [9]


def _write(path, records):
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def test_states_and_the_end_message(tmp_path):
    out = tmp_path / "out"
    _run(out / "m" / "v0-20260101-000000", summary=True)
    run = out / "m" / "v1-20260101-000100"
    _run(run, steps=3, args={"model": "m", "rlhf_type": "grpo", "max_steps": 10})
    log = tmp_path / "run.log"
    log.write_text("[tunesmith] sft: 8 training rows\ntunesmith rlhf: stopped by SIGTERM at step 3 of 10; no "
                   "checkpoint was saved on the signal. ... the last: /x/checkpoint-2. Resume with ...\n")
    dead = L.Launch(pid=2 ** 22 + 7, argv=["rlhf", "--rlhf_type", "grpo"], line="tunesmith rlhf --rlhf_type grpo",
                    output_dir=str(out / "m"), cwd=str(tmp_path), log=str(log), started=time.time() - 60,
                    start_ticks=1)
    (run / L.RUN_RECORD).write_text(json.dumps(dataclasses.asdict(dead)))
    os.makedirs(run / "checkpoint-2")
    runs = {os.path.basename(r.path): r for r in find_runs([str(out)])}
    done, stopped = runs["v0-20260101-000000"], runs["v1-20260101-000100"]
    assert (done.status, done.method, done.step, done.max_steps) == ("finished", "sft", 3, 3)
    assert (stopped.status, stopped.method, stopped.step, stopped.max_steps) == ("stopped", "grpo", 3, 3)
    assert stopped.message.startswith("tunesmith rlhf: stopped by SIGTERM at step 3 of 10")
    assert stopped.checkpoints == [str(run / "checkpoint-2")]
    assert table([stopped])[0][:5] == ["out/m/v1-20260101-000100", "grpo", "stopped", "3/3", "0.3333"]
    assert "**stopped** · step 3/3 (100.0%)" in progress(stopped)
    # resuming repeats the run's own command from its last checkpoint
    assert resume_command(stopped).argv == ["rlhf", "--rlhf_type", "grpo", "--resume_from_checkpoint",
                                            str(run / "checkpoint-2")]


def test_a_start_is_linked_to_the_run_folder_it_made(tmp_path):
    out = tmp_path / "out"
    launch = L.start([sys.executable, "-c", "import time; time.sleep(30)"], ["sft", "--max_steps", "5"],
                     "tunesmith sft --max_steps 5", str(out))
    try:
        listed = find_runs([str(out)])
        assert [(r.status, r.name) for r in listed] == [("starting", "out (no run folder yet)")]
        old = _run(out / "v0-20250101-000000", summary=True)  # an older run: not this start's
        os.utime(os.path.join(old, "args.json"), (launch.started - 3600, launch.started - 3600))
        new = _run(out / "v1-20260101-000000")
        assert link_launches(str(out)) is None
        rec = L.read_launch(os.path.join(new, L.RUN_RECORD))
        assert (rec.pid, rec.started) == (launch.pid, launch.started)
        assert not os.path.exists(os.path.join(old, L.RUN_RECORD))
        statuses = {os.path.basename(r.path): r.status for r in find_runs([str(out)])}
        assert statuses == {"v0-20250101-000000": "finished", "v1-20260101-000000": "training"}
        L.stop(rec)
    finally:
        if L.alive(launch):
            os.kill(launch.pid, 9)


def test_a_start_that_failed_before_its_run_folder_says_why(tmp_path):
    out = tmp_path / "out"
    launch = L.start([sys.executable, "-c", "import sys; print('tunesmith sft: error: --dataset x.jsonl: no such "
                                            "file'); sys.exit(1)"], ["sft"], "tunesmith sft", str(out))
    end = time.time() + 20
    while L.alive(launch) and time.time() < end:
        time.sleep(0.05)
    (r,) = find_runs([str(out)])
    assert r.status == "failed" and r.message == "tunesmith sft: error: --dataset x.jsonl: no such file"


def test_message_of_keeps_a_multi_problem_message():
    text = ("progress...\ntunesmith sft: error: 2 problems with the flags:\n  - --lora_rank 0: expected 1 <= "
            "lora_rank\n  - --max_steps x\n[after]\n")
    assert message_of(text) == ("tunesmith sft: error: 2 problems with the flags:\n  - --lora_rank 0: expected 1 "
                                "<= lora_rank\n  - --max_steps x")
    assert message_of("no message here") == ""
