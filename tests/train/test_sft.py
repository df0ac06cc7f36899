"""`tunesmith sft` end to end on tiny in-process models: it learns, resumes exactly, saves what it should."""
import json
import math
import os
import random

import pytest
import torch

from conftest import HANG_S, losses_by_step, read_jsonl, write_jsonl
from tunesmith.config.parser import parse_args
from tunesmith.train import recipe

WORDS = "red blue green black white gold pink gray".split()


def copy_row(seq):
    return {"messages": [{"role": "user", "content": "Repeat: " + " ".join(seq)},
                         {"role": "assistant", "content": " ".join(seq)}]}


def run(argv):
    return recipe.main(parse_args("sft", argv))


@pytest.mark.slow
def test_learns_a_held_out_task(tiny_models, tmp_path):
    """Copying three-word sequences: loss falls and exact match on unseen sequences rises from 0."""
    from tunesmith.inference.chat import generate_replies
    from transformers import AutoModelForCausalLM, AutoTokenizer

    combos = [(a, b, c) for a in WORDS for b in WORDS for c in WORDS]
    random.Random(0).shuffle(combos)
    train, held_out = combos[:300], combos[300:330]
    data = write_jsonl(tmp_path / "train.jsonl", [copy_row(s) for s in train])
    model_dir = tiny_models("qwen2")
    prompts = [copy_row(s)["messages"][:1] for s in held_out]
    expect = [" ".join(s) for s in held_out]
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    before = sum(o == e for o, e in zip(generate_replies(base, tok, prompts, max_new_tokens=8), expect)) / len(expect)
    res = run(["--model", model_dir, "--dataset", data, "--train_type", "full", "--learning_rate", "3e-3",
               "--max_steps", "400", "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1",
               "--warmup_ratio", "0.05", "--output_dir", str(tmp_path / "out"), "--report_to", "none",
               "--logging_steps", "20", "--save_strategy", "no", "--gradient_checkpointing", "false"])
    outs = generate_replies(res["model"], res["tokenizer"], prompts, max_new_tokens=8)
    after = sum(o == e for o, e in zip(outs, expect)) / len(expect)
    log = losses_by_step(res["run_dir"])
    assert before == 0.0
    assert after >= 0.8, outs[:5]
    assert log[max(log)] < 0.1 * log[1]


def _variable_length_data(tmp_path, n=16):
    rows = [{"messages": [{"role": "user", "content": "say " + " ".join(WORDS[: 1 + i % 7])},
                          {"role": "assistant", "content": " ".join(WORDS[: 1 + (3 * i) % 8])}]} for i in range(n)]
    return write_jsonl(tmp_path / "var.jsonl", rows)


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch(tiny_models, tmp_path):
    data = _variable_length_data(tmp_path, 8)
    common = ["--model", tiny_models("qwen2"), "--dataset", data, "--train_type", "full", "--max_steps", "1",
              "--report_to", "none", "--save_strategy", "no", "--learning_rate", "1e-2", "--lr_scheduler_type",
              "constant", "--max_grad_norm", "0"]
    big = run(common + ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
                        "--output_dir", str(tmp_path / "a")])
    acc = run(common + ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                        "--output_dir", str(tmp_path / "b")])
    assert abs(losses_by_step(big["run_dir"])[1] - losses_by_step(acc["run_dir"])[1]) < 1e-5
    sa, sb = big["model"].state_dict(), acc["model"].state_dict()
    assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) < 1e-5


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(tiny_models, tmp_path):
    data = _variable_length_data(tmp_path, 24)
    common = ["--model", tiny_models("qwen2"), "--dataset", data, "--train_type", "lora", "--lora_dropout", "0.1",
              "--max_steps", "8", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
              "--logging_steps", "1", "--save_steps", "3", "--report_to", "none", "--learning_rate", "5e-3"]
    full = run(common + ["--output_dir", str(tmp_path / "full")])
    ckpt = os.path.join(full["run_dir"], "checkpoint-3")
    resumed = run(common + ["--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", ckpt])
    a, b = losses_by_step(full["run_dir"]), losses_by_step(resumed["run_dir"])
    # steps 1-3 come from the checkpoint (the resumed run's log carries the whole curve); epoch 1 has 6 steps:
    # resume crosses an epoch boundary too
    assert sorted(b) == [1, 2, 3, 4, 5, 6, 7, 8]
    for step in b:
        assert abs(a[step] - b[step]) < 1e-6, (step, a[step], b[step])


@pytest.mark.slow
def test_checkpoints_rotation_and_no_secrets(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("SWANLAB_API_KEY", "env-secret-12345")
    data = _variable_length_data(tmp_path, 16)
    out = tmp_path / "out"
    res = run(["--model", tiny_models("qwen2"), "--dataset", data, "--max_steps", "10", "--save_steps", "2",
               "--save_total_limit", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
               "--output_dir", str(out), "--report_to", "none", "--swanlab_token", "flag-secret-67890",
               "--hub_token", "hf_flagsecret", "--split_dataset_ratio", "0.25", "--eval_steps", "2"])
    run_dir = res["run_dir"]
    assert os.path.basename(run_dir).startswith("v0-")
    ckpts = sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint-"))
    best = os.path.basename(res["state"].best_model_checkpoint)
    assert set(ckpts) == {"checkpoint-8", "checkpoint-10"} | {best}  # newest two plus the best
    for name in ("args.json", "logging.jsonl", "val_dataset.jsonl"):
        assert os.path.isfile(os.path.join(run_dir, name))
    assert len(read_jsonl(os.path.join(run_dir, "val_dataset.jsonl"))) == 4
    ck = os.path.join(run_dir, "checkpoint-10")
    for name in ("adapter_config.json", "adapter_model.safetensors", "args.json", "trainer_state.json",
                 "optimizer.pt", "scheduler.pt", "rng_state.pth", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(ck, name)), name
    assert json.load(open(os.path.join(run_dir, "args.json")))["swanlab_token"] == "<redacted>"
    for dp, _, files in os.walk(out):
        for f in files:
            blob = open(os.path.join(dp, f), "rb").read()
            for secret in (b"env-secret-12345", b"flag-secret-67890", b"hf_flagsecret"):
                assert secret not in blob, os.path.join(dp, f)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models("qwen2")), ck)
    log = read_jsonl(os.path.join(run_dir, "logging.jsonl"))
    assert any("eval_loss" in r and "eval_token_acc" in r for r in log)
    steps = [r for r in log if "loss" in r]
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_second", "memory(GiB)", "epoch"} <= set(steps[0])


@pytest.mark.slow
def test_full_checkpoint_is_a_normal_hf_model(tiny_models, tmp_path):
    data = _variable_length_data(tmp_path, 8)
    res = run(["--model", tiny_models("llama"), "--dataset", data, "--train_type", "full", "--max_steps", "2",
               "--output_dir", str(tmp_path / "o"), "--report_to", "none", "--per_device_train_batch_size", "4"])
    ck = res["state"].last_model_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(ck)
    t = AutoTokenizer.from_pretrained(ck)
    assert t.chat_template and m.config.model_type == "llama"
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(m(ids).logits, res["model"](ids).logits, atol=1e-6)


@pytest.mark.slow
def test_qlora_trains_and_saves(tiny_models, tmp_path):
    pytest.importorskip("bitsandbytes")
    data = _variable_length_data(tmp_path, 8)
    res = run(["--model", tiny_models("qwen2"), "--dataset", data, "--quant_method", "bnb", "--quant_bits", "4",
               "--max_steps", "3", "--learning_rate", "1e-2", "--output_dir", str(tmp_path / "q"), "--report_to",
               "none", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--logging_steps", "1"])
    import bitsandbytes as bnb
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in res["model"].modules())
    assert os.path.isfile(os.path.join(res["state"].last_model_checkpoint, "adapter_model.safetensors"))
    assert all(v == v for v in losses_by_step(res["run_dir"]).values())


@pytest.mark.slow
def test_gpt_oss_expert_lora_with_router_loss(tiny_models, tmp_path, capsys):
    data = _variable_length_data(tmp_path, 8)
    res = run(["--model", tiny_models("gpt_oss"), "--dataset", data, "--target_modules", "all-linear",
               "--target_parameters", "mlp.experts.gate_up_proj", "mlp.experts.down_proj",
               "--router_aux_loss_coef", "1e-3", "--max_steps", "3", "--output_dir", str(tmp_path / "g"),
               "--report_to", "none", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2"])
    assert "does not support dropout" in capsys.readouterr().err
    from safetensors.torch import load_file
    keys = load_file(os.path.join(res["state"].last_model_checkpoint, "adapter_model.safetensors")).keys()
    assert any("experts" in k for k in keys) and any("q_proj" in k for k in keys)
    assert not any("router" in k for k in keys)  # all-linear leaves the router alone


@pytest.mark.slow
def test_seed_sft_command_runs_verbatim(tiny_models, tmp_path, capsys):
    """The seeds' SFT flag sets (../shared/seeds/001, 003): paths and step counts changed, the rest verbatim."""
    from tunesmith.cli import main
    data = write_jsonl(tmp_path / "train.json", [
        {"conversations": [{"from": "human", "value": "我最近总是感到焦虑，该怎么办？"},
                           {"from": "gpt", "value": "焦虑是一种常见的情绪反应。"}]},
        {"messages": [{"role": "user", "content": "Source Text：There, they found the body."},
                      {"role": "assistant", "content": "<think>\nxxx</think>\n\n在那里，他们发现了尸体。"}]},
        {"instruction": "沐雪的功能是什么？", "input": "", "output": "喵~本雪的主要功能是让你开心喵！", "history": []},
    ] * 4)
    out = tmp_path / "output"
    rc = main(["sft", "--model", tiny_models("gpt_oss"), "--dataset", data, "--train_type", "lora",
               "--torch_dtype", "bfloat16", "--num_train_epochs", "1", "--per_device_train_batch_size", "1",
               "--per_device_eval_batch_size", "1", "--learning_rate", "1e-4", "--lora_rank", "8", "--lora_alpha", "32",
               "--target_modules", "all-linear", "--gradient_accumulation_steps", "16", "--eval_steps", "50",
               "--save_steps", "50", "--save_total_limit", "2", "--logging_steps", "5", "--max_length", "8192",
               "--output_dir", str(out), "--warmup_ratio", "0.05", "--dataloader_num_workers", "4",
               "--use_liger_kernel", "true", "--load_from_cache_file", "false", "--loss_scale", "ignore_empty_think",
               "--save_strategy", "epoch", "--model_author", "gxb", "--model_name", "gxb-gpt-oss-20b-agent-distill",
               "--report_to", "swanlab", "--swanlab_project", "swift-robot",
               "--router_aux_loss_coef", "1e-3", "--swanlab_token", "sk-seed-token", "--swanlab_mode", "cloud",
               "--swanlab_exp_name", "gpt-oss-20b-sft-v1"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "skipped on this CPU run" in err
    run_dir = next(p for p in out.iterdir() if p.name.startswith("v0-"))
    assert (run_dir / "checkpoint-1" / "adapter_model.safetensors").is_file()
    for dp, _, files in os.walk(out):
        for f in files:
            assert b"sk-seed-token" not in open(os.path.join(dp, f), "rb").read()


@pytest.mark.slow
@pytest.mark.parametrize("cmd,flags", [
    ("sft", ["--learning_rate", "1e10"]),                                              # LoRA, AdamW
    ("sft", ["--train_type", "full", "--learning_rate", "1e38", "--optim", "sgd", "--max_grad_norm", "0"]),
    ("rlhf", ["--learning_rate", "1e10"]),                                             # DPO
    ("sft", ["--torch_dtype", "float16", "--learning_rate", "1e10"]),                  # LoRA on a float16 model
], ids=["lora-1e10", "full-sgd-1e38", "dpo-1e10", "fp16-1e10"])
def test_forced_nan_never_calls_the_weights_that_gave_it_good(tiny_models, tmp_path, cmd, flags):
    """Step 1's update overflows the weights (still finite: ~1e10) and step 2's loss is NaN. checkpoint-1 holds those
    weights: the message says so and names no good checkpoint (it used to call checkpoint-1 good, and resuming from
    it hit NaN again); checkpoint-1 is marked (diverged.json) and resuming from it is refused with the reason."""
    import json
    import re

    from tunesmith.errors import ConfigError
    from tunesmith.train import recipe
    from tunesmith.train.loop import TrainingDiverged

    data = _variable_length_data(tmp_path, 8) if cmd == "sft" else write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": f"q{i}", "chosen": "good one", "rejected": "bad"} for i in range(8)])
    common = ["--model", tiny_models("qwen2"), "--dataset", data, "--report_to", "none",
              "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1"]
    with pytest.raises(TrainingDiverged) as e:
        recipe.main(parse_args(cmd, [*common, "--max_steps", "6", "--save_steps", "1", *flags,
                                     "--output_dir", str(tmp_path / "n")]))
    msg = str(e.value)
    bad = re.search(r"(\S+checkpoint-1) holds the weights that gave it: do not resume from it", msg)
    assert bad and "Last good checkpoint (a later step gave a finite loss from its weights): none" in msg, msg
    assert json.load(open(os.path.join(bad.group(1), "diverged.json")))["step"] == 2
    with pytest.raises(ConfigError, match="gave a non-finite loss at step 2 \\(diverged.json\\)"):
        recipe.main(parse_args(cmd, [*common, "--max_steps", "3", "--learning_rate", "1e-4",
                                     "--resume_from_checkpoint", bad.group(1), "--output_dir", str(tmp_path / "r")]))
    if "--train_type" not in flags:  # an adapter: training from it, merging or serving it are refused too
        from tunesmith.models.checkpoint import resolve_checkpoint

        with pytest.raises(ConfigError, match=r"--adapters .*checkpoint-1: its weights gave a non-finite loss"):
            recipe.main(parse_args(cmd, [*common, "--max_steps", "1", "--adapters", bad.group(1),
                                         "--output_dir", str(tmp_path / "a")]))
        for command in ("export", "infer", "deploy"):
            with pytest.raises(ConfigError, match="diverged.json"):
                resolve_checkpoint(parse_args(command, ["--adapters", bad.group(1)]))


@pytest.mark.slow
def test_after_a_resume_the_failure_message_names_the_checkpoint_resumed_from(tiny_models, tmp_path):
    from tunesmith.train.loop import TrainingDiverged
    data = _variable_length_data(tmp_path, 8)
    common = ["--model", tiny_models("qwen2"), "--dataset", data, "--train_type", "full", "--report_to", "none",
              "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--optim", "sgd",
              "--lr_scheduler_type", "constant", "--max_grad_norm", "0"]
    first = run(common + ["--max_steps", "1", "--save_steps", "1", "--output_dir", str(tmp_path / "a")])
    ckpt = first["state"].last_model_checkpoint
    with pytest.raises(TrainingDiverged, match=f"Last good checkpoint .*: {ckpt}"):
        run(common + ["--max_steps", "6", "--save_steps", "100", "--learning_rate", "1e38", "--output_dir",
                      str(tmp_path / "b"), "--resume_from_checkpoint", ckpt, "--resume_only_model", "true"])
    # and the checkpoint named good trains on with a sane learning rate
    res = run(common + ["--max_steps", "3", "--learning_rate", "1e-4", "--output_dir", str(tmp_path / "c"),
                        "--resume_from_checkpoint", ckpt, "--resume_only_model", "true"])
    assert res["state"].global_step == 3


@pytest.mark.slow
def test_forced_nan_in_float16_names_a_good_checkpoint_that_trains_on(tiny_models, tmp_path):
    """float16 (CPU runs it): a sane first step saves checkpoint-1; resumed with --learning_rate 1e10 the loss
    turns NaN, and the checkpoint the message calls good loads and gives a finite loss — resuming from it with a
    sane learning rate trains on, with finite losses."""
    import re

    from tunesmith.train.loop import TrainingDiverged
    data = _variable_length_data(tmp_path, 8)
    common = ["--model", tiny_models("qwen2"), "--dataset", data, "--torch_dtype", "float16", "--report_to", "none",
              "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--logging_steps", "1"]
    first = run(common + ["--max_steps", "1", "--save_steps", "1", "--output_dir", str(tmp_path / "a")])
    assert next(first["model"].parameters()).dtype == torch.float16
    ckpt = first["state"].last_model_checkpoint
    with pytest.raises(TrainingDiverged, match="the loss became nan") as e:
        run(common + ["--max_steps", "6", "--save_steps", "100", "--learning_rate", "1e10", "--output_dir",
                      str(tmp_path / "b"), "--resume_from_checkpoint", ckpt, "--resume_only_model", "true"])
    good = re.search(r"Last good checkpoint \(a later step gave a finite loss from its weights\): (\S+)\.",
                     str(e.value)).group(1)
    assert good == ckpt, str(e.value)
    res = run(common + ["--max_steps", "3", "--learning_rate", "1e-4", "--output_dir", str(tmp_path / "c"),
                        "--resume_from_checkpoint", good, "--resume_only_model", "true"])
    losses = [r["loss"] for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "loss" in r]
    assert res["state"].global_step == 3 and losses and all(math.isfinite(x) for x in losses), losses


@pytest.mark.slow
@pytest.mark.parametrize("nproc,sig", [(1, "SIGTERM"), (1, "SIGINT"), (2, "SIGTERM")],
                         ids=["sigterm", "sigint", "torchrun-sigterm"])
def test_a_signal_stops_training_with_one_message_naming_the_last_checkpoint(tiny_models, tmp_path, nproc, sig):
    """SIGTERM (exit 143) or Ctrl-C (130) mid-run: no traceback, one message (rank 0 only under torchrun, where every
    process gets the signal) naming the last complete checkpoint and how to resume; no checkpoint is saved on the
    signal and no unfinished save is left; resuming from the one named trains on."""
    import glob
    import re
    import signal
    import subprocess
    import sys
    import time

    data = _variable_length_data(tmp_path, 8)
    out = tmp_path / "o"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc > 1:
        from conftest import free_port
        env.update({"NPROC_PER_NODE": str(nproc), "MASTER_PORT": str(free_port())})
    flags = ["--model", tiny_models("qwen2"), "--dataset", data, "--report_to", "none", "--save_steps", "2",
             "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--output_dir", str(out)]
    p = subprocess.Popen([sys.executable, "-m", "tunesmith", "sft", *flags, "--max_steps", "100000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + HANG_S  # the wait is for the checkpoint; this only bounds a hang
    while not glob.glob(str(out / "v*" / "checkpoint-2")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    if p.poll() is not None or not glob.glob(str(out / "v*" / "checkpoint-2")):
        p.kill()
        pytest.fail("no checkpoint-2 to stop after: " + p.communicate()[1][-3000:])
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + getattr(signal, sig), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith(f"tunesmith sft: stopped by {sig} at step ")]
    assert len(said) == 1, err[-3000:]
    named = re.search(r"the last: (\S+)\. Resume with the same command and --resume_from_checkpoint (\S+)$",
                      said[0])
    assert named and named.group(1) == named.group(2), said[0]
    steps = sorted(int(c.rsplit("-", 1)[1]) for c in glob.glob(str(out / "v*" / "checkpoint-*")))
    assert named.group(1).endswith(f"checkpoint-{steps[-1]}") and not glob.glob(str(out / "v*" / ".tmp-*"))
    # resumed here in one process: a two-process checkpoint's data position is per process, so it is dropped
    skip = ["--ignore_data_skip", "true"] if nproc > 1 else []
    res = run([*flags, "--max_steps", str(steps[-1] + 2), "--resume_from_checkpoint", named.group(1), *skip])
    assert res["state"].global_step == steps[-1] + 2


@pytest.mark.slow
def test_nan_gradient_with_a_finite_loss_is_never_applied(tiny_models, tmp_path, monkeypatch):
    """A finite loss whose gradient is NaN (here: a hook on one LoRA weight, from step 3 on) stops the run before
    the update; the checkpoint it names holds finite weights."""
    from safetensors.torch import load_file
    from tunesmith.train import recipe, setup
    from tunesmith.train.loop import TrainingDiverged

    calls = []
    real = setup.prepare_model

    def poisoned(*a, **kw):
        model, info = real(*a, **kw)
        p = next(p for p in model.parameters() if p.requires_grad)
        p.register_hook(lambda g: g * float("nan") if len(calls.append(1) or calls) > 2 else g)
        return model, info

    monkeypatch.setattr(recipe, "prepare_model", poisoned)
    data = _variable_length_data(tmp_path, 8)
    with pytest.raises(TrainingDiverged, match=r"gradient norm became nan \(loss [0-9.]+\) at step 3.*checkpoint-2"):
        run(["--model", tiny_models("qwen2"), "--dataset", data, "--max_steps", "6", "--save_steps", "1",
             "--output_dir", str(tmp_path / "g"), "--report_to", "none", "--per_device_train_batch_size", "4",
             "--gradient_accumulation_steps", "1"])
    ckpt = next((tmp_path / "g").glob("v*/checkpoint-2"))
    assert all(bool(t.isfinite().all()) for t in load_file(str(ckpt / "adapter_model.safetensors")).values())


def test_crash_mid_save_leaves_no_checkpoint(tmp_path):
    from tunesmith.files import atomic_dir
    from tunesmith.runs.run_dir import list_checkpoints
    with pytest.raises(RuntimeError):
        with atomic_dir(str(tmp_path / "checkpoint-5")) as tmp:
            with open(os.path.join(tmp, "adapter_model.safetensors"), "w") as fh:
                fh.write("partial")
            raise RuntimeError("disk full")
    assert list_checkpoints(str(tmp_path)) == [] and os.listdir(tmp_path) == []


def test_bad_data_fails_before_anything_is_written(tiny_models, tmp_path):
    from tunesmith.errors import DataError
    bad = write_jsonl(tmp_path / "bad.jsonl", [copy_row(["red"]), {"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'messages'"):
        run(["--model", tiny_models("qwen2"), "--dataset", bad, "--output_dir", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_missing_model_is_one_clear_error(tmp_path, monkeypatch):
    import subprocess
    import sys
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = _variable_length_data(tmp_path, 2)
    r = subprocess.run([sys.executable, "-m", "tunesmith", "sft", "--model", "models/no-such-model", "--dataset", data,
                        "--use_hf", "true", "--output_dir", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 1
    assert "--model models/no-such-model: not a local directory" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_same_seed_same_lora_run(tiny_models, tmp_path):
    """LoRA's random init is drawn after seeding: two runs with one --seed give the same adapter."""
    from safetensors.torch import load_file
    data = _variable_length_data(tmp_path, 8)
    outs = []
    for name in ("a", "b"):
        res = run(["--model", tiny_models("qwen2"), "--dataset", data, "--max_steps", "2", "--seed", "7",
                   "--output_dir", str(tmp_path / name), "--report_to", "none", "--per_device_train_batch_size", "4"])
        outs.append(load_file(os.path.join(res["state"].last_model_checkpoint, "adapter_model.safetensors")))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


@pytest.mark.slow
def test_system_file_is_saved_as_text_and_survives_another_cwd(tiny_models, tmp_path, monkeypatch):
    """--system prompt.txt (relative) is read at start: args.json holds the text, so infer on the checkpoint from
    another directory gets the prompt, not the string 'prompt.txt'."""
    from tunesmith.inference.chat import build_engine

    prompt = "You are a pirate.\nAlways say arr.\n"
    train_dir, elsewhere = tmp_path / "train", tmp_path / "elsewhere"
    train_dir.mkdir()
    elsewhere.mkdir()
    (train_dir / "prompt.txt").write_text(prompt, encoding="utf-8")
    monkeypatch.chdir(train_dir)
    res = run(["--model", tiny_models("qwen2"), "--dataset", _variable_length_data(train_dir, 4), "--max_steps", "1",
               "--system", "prompt.txt", "--output_dir", "out", "--report_to", "none",
               "--per_device_train_batch_size", "4"])
    ckpt = res["state"].last_model_checkpoint
    for path in (os.path.join(res["run_dir"], "args.json"), os.path.join(ckpt, "args.json")):
        assert json.load(open(path))["system"] == prompt
    monkeypatch.chdir(elsewhere)
    assert os.path.isabs(ckpt)
    engine, _, _, _ = build_engine(parse_args("infer", ["--adapters", ckpt, "--max_new_tokens", "2"]))
    assert engine.encoder.system == prompt


def test_old_args_json_with_a_system_path(tmp_path, monkeypatch):
    """An args.json written before the text was saved holds the path: read from the same directory, else a clear
    error rather than the path as the system prompt."""
    from tunesmith.errors import ConfigError
    from tunesmith.models.checkpoint import resolve_checkpoint

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "args.json").write_text(json.dumps({"model": "m", "system": "prompt.txt"}), encoding="utf-8")
    (tmp_path / "prompt.txt").write_text("Be brief.", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    args, _ = resolve_checkpoint(parse_args("infer", ["--model", str(ckpt)]))
    assert args.system == "Be brief."
    monkeypatch.chdir(ckpt)
    with pytest.raises(ConfigError, match=r"args.json: system is the path .*'prompt.txt'.* pass --system"):
        resolve_checkpoint(parse_args("infer", ["--model", str(ckpt)]))


@pytest.mark.slow
@pytest.mark.parametrize("name, dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16), (None, None)])
def test_lora_dtype_casts_only_the_lora_weights(tiny_models, name, dtype):
    from tunesmith.models.load import attach_lora, load_model

    argv = ["--model", tiny_models(), "--torch_dtype", "float32"] + (["--lora_dtype", name] if name else [])
    args = parse_args("sft", argv)
    model = attach_lora(load_model(args, args.model), args)
    lora = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    base = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    assert lora == {dtype or torch.float32} and base == {torch.float32}  # default: peft's float32
    ids = torch.tensor([[1, 2, 3, 4]])
    out = model(input_ids=ids, labels=ids)  # peft casts each layer's input to its LoRA weights' dtype
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_finish_run_names_the_metric_that_chose_the_best_checkpoint(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    from tunesmith.train import setup

    monkeypatch.setattr("tunesmith.runs.report.write_run_report", lambda run_dir: os.path.join(run_dir, "report.html"))
    state = SimpleNamespace(global_step=10, last_model_checkpoint="ckpt-10", best_model_checkpoint="ckpt-5",
                            best_metric=0.875)
    (tmp_path / "args.json").write_text(json.dumps({"metric_for_best_model": "token_acc"}))
    setup.finish_run(state, str(tmp_path))  # as the training commands call it: read from the run's args.json
    assert "ckpt-5 (eval_token_acc 0.8750)" in capsys.readouterr().err
    setup.finish_run(state, str(tmp_path), "eval_rewards/accuracies")
    assert "(eval_rewards/accuracies 0.8750)" in capsys.readouterr().err
    (tmp_path / "args.json").unlink()
    setup.finish_run(state, str(tmp_path))  # no args.json: the default metric
    assert "(eval_loss 0.8750)" in capsys.readouterr().err


@pytest.mark.slow
def test_the_logged_learning_rate_is_the_one_each_step_used(tiny_models, tmp_path):
    """As transformers' Trainer (and so ms-swift) logs it: linear decay from 1e-2 over 4 steps without warm-up logs
    1e-2, 7.5e-3, 5e-3, 2.5e-3 — the rate before the schedule moves on, never the next step's."""
    data = _variable_length_data(tmp_path, 8)
    res = run(["--model", tiny_models("qwen2"), "--dataset", data, "--max_steps", "4", "--logging_steps", "1",
               "--learning_rate", "1e-2", "--lr_scheduler_type", "linear", "--warmup_ratio", "0",
               "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--report_to", "none",
               "--save_strategy", "no", "--output_dir", str(tmp_path / "out")])
    lrs = [r["learning_rate"] for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "loss" in r]
    assert lrs == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3])


@pytest.mark.slow
def test_a_full_disk_mid_run_is_one_message_and_leaves_every_checkpoint_loadable(tiny_models, tmp_path, monkeypatch):
    """ENOSPC while writing checkpoint-2 (simulated: the save raises what a full disk raises) and while appending
    to logging.jsonl: one message naming the file, what it is, why, and the checkpoint to resume from;
    checkpoint-1 is complete and loads, nothing half-written looks like a checkpoint."""
    import errno

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.errors import TunesmithError
    from tunesmith.runs.track import JsonlLog
    from tunesmith.train import recipe

    data = _variable_length_data(tmp_path, 8)
    common = ["--model", tiny_models("qwen2"), "--dataset", data, "--report_to", "none", "--max_steps", "4",
              "--save_steps", "1", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1"]
    real = recipe.save_model_fn

    def full_disk_at_2(tok, initial=None, model_dir=None):
        save = real(tok, initial, model_dir)

        def wrapped(model, path, state_dict=None):
            if "checkpoint-2" in path:
                raise OSError(errno.ENOSPC, "No space left on device")
            save(model, path, state_dict)
        return wrapped

    monkeypatch.setattr(recipe, "save_model_fn", full_disk_at_2)
    with pytest.raises(TunesmithError) as e:
        run([*common, "--output_dir", str(tmp_path / "a")])
    msg = str(e.value)
    run_dir = next((tmp_path / "a").iterdir())
    assert msg.startswith(f"could not write a checkpoint ({run_dir / 'checkpoint-2'}): the disk is full.") and \
        f"Last good checkpoint: {run_dir / 'checkpoint-1'}" in msg and "--resume_from_checkpoint" in msg, msg
    assert sorted(p.name for p in run_dir.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models("qwen2")),
                              str(run_dir / "checkpoint-1"))
    monkeypatch.setattr(recipe, "save_model_fn", real)

    writes = []

    def log_full_at_3(self, record):
        writes.append(record)
        if len(writes) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(JsonlLog, "write", log_full_at_3)
    with pytest.raises(TunesmithError, match=r"could not write a run file|could not write the training log"):
        run([*common, "--output_dir", str(tmp_path / "b")])


def test_no_room_or_no_permission_is_found_before_the_model_loads(tiny_models, tmp_path, monkeypatch):
    """A disk too small for one checkpoint, or an output folder this user cannot write, is refused before
    anything loads or is written."""
    import shutil
    from collections import namedtuple

    from tunesmith.errors import ConfigError
    from tunesmith.train import recipe, setup

    data = _variable_length_data(tmp_path, 4)
    common = ["--model", tiny_models("qwen2"), "--dataset", data, "--report_to", "none", "--max_steps", "1",
              "--train_type", "full"]
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 20, 10 << 20, 1000))
    calls = []
    monkeypatch.setattr(setup, "load_model", lambda *a, **k: calls.append(1))
    with pytest.raises(ConfigError, match=r"GiB free on its disk, but one checkpoint of this run takes about"):
        recipe.main(parse_args("sft", [*common, "--output_dir", str(tmp_path / "o")]))
    assert not calls and not (tmp_path / "o").exists()
    monkeypatch.undo()
    import os
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p).startswith(str(tmp_path)) else real_access(p, m))
    with pytest.raises(ConfigError, match="is not writable by this user"):
        recipe.main(parse_args("sft", [*common, "--output_dir", str(tmp_path / "ro" / "out")]))
