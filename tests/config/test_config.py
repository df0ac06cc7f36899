"""The training configuration is resolved once: every bad flag value is reported at once, before anything is loaded
or written; the resolved slices are frozen; the parsed arguments are not changed; each method is one object."""
import dataclasses
import math

import pytest

from tunesmith.config.parser import parse_args, to_record
from tunesmith.errors import ConfigError
from tunesmith.train import recipe

BASE = ["--model", "some/model", "--dataset", "data.jsonl"]

# (flags, what the message must name): values that used to end in a traceback or train without a word
BAD_VALUES = [
    (["--learning_rate", "-1e-4"], "--learning_rate -0.0001"),
    (["--learning_rate", "nan"], "--learning_rate nan"),
    (["--lora_rank", "0"], "--lora_rank 0"),
    (["--lora_rank", "-1"], "--lora_rank -1"),
    (["--lora_alpha", "0"], "--lora_alpha 0"),
    (["--lora_dropout", "1.5"], "--lora_dropout 1.5"),
    (["--num_train_epochs", "nan"], "--num_train_epochs nan"),
    (["--num_train_epochs", "0"], "--num_train_epochs 0"),
    (["--num_train_epochs", "-1"], "--num_train_epochs -1"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0"),
    (["--save_steps", "0"], "--save_steps 0"),
    (["--eval_steps", "0"], "--eval_steps 0"),
    (["--logging_steps", "0"], "--logging_steps 0"),
    (["--adam_beta2", "1.5"], "--adam_beta2 1.5"),
    (["--seed", "-1"], "--seed -1"),
    (["--max_length", "0"], "--max_length 0"),
    (["--warmup_ratio", "2"], "--warmup_ratio 2"),
    (["--max_grad_norm", "-1"], "--max_grad_norm -1"),
    (["--max_grad_norm", "nan"], "--max_grad_norm nan"),
    (["--learning_rate", "inf"], "--learning_rate inf"),
    (["--num_train_epochs", "inf"], "--num_train_epochs inf"),
    (["--lora_dropout", "-0.1"], "--lora_dropout -0.1"),
    (["--lora_alpha", "-8"], "--lora_alpha -8"),
    (["--weight_decay", "-1"], "--weight_decay -1"),
    (["--adam_beta1", "1"], "--adam_beta1 1"),
    (["--adam_beta2", "-0.5"], "--adam_beta2 -0.5"),
    (["--warmup_steps", "-1"], "--warmup_steps -1"),
    (["--warmup_ratio", "-0.1"], "--warmup_ratio -0.1"),
    (["--save_total_limit", "-2"], "--save_total_limit -2"),
    (["--max_steps", "-5"], "--max_steps -5: expected"),
    (["--dataloader_num_workers", "-1"], "--dataloader_num_workers -1"),
    (["--dataset_num_proc", "0"], "--dataset_num_proc 0"),
    (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size 0"),
    (["--eval_steps", "-3"], "--eval_steps -3"),
    (["--save_steps", "-1"], "--save_steps -1"),
    (["--logging_steps", "-1"], "--logging_steps -1"),
    (["--gradient_accumulation_steps", "-2"], "--gradient_accumulation_steps -2"),
    (["--num_train_epochs", "-0.5"], "--num_train_epochs -0.5"),
    (["--split_dataset_ratio", "1.5"], "--split_dataset_ratio 1.5"),
    (["--split_dataset_ratio", "-0.1"], "--split_dataset_ratio -0.1"),
    (["--packing", "true", "--packing_length", "0"], "--packing_length 0"),
    (["--max_length", "-5"], "--max_length -5"),
    (["--seed", "99999999999"], "--seed 99999999999"),
    (["--data_seed", "-1"], "--data_seed -1"),
    (["--max_new_tokens", "-1"], "--max_new_tokens -1"),
    (["--attn_impl", "flash"], "--attn_impl flash: expected one of"),
    (["--loss_scale", "everything"], "--loss_scale: unknown part 'everything'"),
    (["--report_to", "tensorbord"], "--report_to tensorbord: not a tracker tunesmith writes to; did you mean "
                                    "tensorboard?"),
    (["--train_type", "full", "--torch_dtype", "float16"], "full training in float16"),
    (["--train_type", "full", "--quant_method", "bnb", "--quant_bits", "4"], "QLoRA"),
    (["--streaming", "true"], "--streaming needs --max_steps N"),
    (["--streaming", "true", "--max_steps", "5", "--split_dataset_ratio", "0.1"], "cannot split a stream"),
]


@pytest.mark.parametrize("flags,named", BAD_VALUES, ids=[" ".join(f) for f, _ in BAD_VALUES])
def test_a_bad_value_is_one_clear_error_before_anything_runs(tmp_path, flags, named):
    out = tmp_path / "out"
    args = parse_args("sft", [*BASE, "--output_dir", str(out), *flags])
    with pytest.raises(ConfigError) as e:
        recipe.main(args)
    assert named in str(e.value)
    assert not out.exists()  # refused before the run directory


def test_every_problem_is_reported_at_once():
    args = parse_args("rlhf", ["--dataset", "d.jsonl", "--learning_rate", "-1", "--lora_rank", "0",
                               "--per_device_train_batch_size", "0", "--beta", "0", "--loss_type", "sigmod"])
    with pytest.raises(ConfigError) as e:
        recipe.configure(args)
    text = str(e.value)
    assert text.startswith("6 problems with the flags:")
    for part in ("--model", "--learning_rate -1.0", "--lora_rank 0", "--per_device_train_batch_size 0",
                 "--beta 0.0", "--loss_type sigmod: not a loss of --rlhf_type dpo; did you mean sigmoid?"):
        assert part in text, part


def test_resolution_fills_ms_swift_defaults_without_changing_the_parsed_arguments():
    args = parse_args("rlhf", [*BASE, "--rlhf_type", "simpo", "--per_device_train_batch_size", "2"])
    before = to_record(args)
    cfg, method = recipe.configure(args, world_size=2)
    assert to_record(args) == before  # resolve returned a new object
    assert cfg.optim.learning_rate == 1e-4 and cfg.optim.gradient_accumulation_steps == math.ceil(16 / 2 / 2)
    assert cfg.output.eval_strategy == "no"  # no validation data: ms-swift's rule
    assert cfg.data.loss_scale == "last_round" and cfg.output.output_dir.endswith("model")
    assert (method.name, method.beta, method.loss_type) == ("simpo", 2.0, "simpo")
    assert cfg.args.beta == 2.0 and cfg.args.loss_type == ["simpo"]  # what args.json records
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.learning_rate = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        method.beta = 0.5
    with pytest.raises(AttributeError):  # a stage sees only its slice
        cfg.optim.dataset  # noqa: B018


@pytest.mark.parametrize("rlhf_type,cls,needs_reference,loss_scale", [
    ("dpo", "DPO", True, "last_round"), ("cpo", "CPO", False, "last_round"), ("simpo", "CPO", False, "last_round"),
    ("orpo", "ORPO", False, "default"), ("kto", "KTO", True, "last_round")])
def test_each_method_is_one_object(rlhf_type, cls, needs_reference, loss_scale):
    args = parse_args("rlhf", [*BASE, "--rlhf_type", rlhf_type, "--per_device_train_batch_size", "2"])
    _, method = recipe.configure(args)
    assert type(method).__name__ == cls and type(method).__module__ == f"tunesmith.train.methods.{cls.lower()}"
    assert method.needs_reference is needs_reference and method.default_loss_scale == loss_scale
    _, sft = recipe.configure(parse_args("sft", BASE))
    assert type(sft).__name__ == "SFT" and not sft.needs_reference and sft.rows == "sft"


METHOD_VALUES = [  # (rlhf_type, flags, what the message names): preference flags out of range ran silently
    ("dpo", ["--label_smoothing", "0.7"], "--label_smoothing 0.7"),
    ("dpo", ["--rpo_alpha", "-1"], "--rpo_alpha -1"),
    ("dpo", ["--ld_alpha", "5"], "--ld_alpha 5"),
    ("dpo", ["--loss_type", "discopop", "--discopop_tau", "0"], "--discopop_tau 0"),
    ("cpo", ["--cpo_alpha", "-1"], "--cpo_alpha -1"),
    ("simpo", ["--simpo_gamma", "-3"], "--simpo_gamma -3"),
    ("kto", ["--desirable_weight", "-1"], "--desirable_weight -1"),
    ("kto", ["--desirable_weight", "0", "--undesirable_weight", "0"], "both 0"),
]


@pytest.mark.parametrize("rlhf_type,flags,named", METHOD_VALUES, ids=[" ".join(f) for _, f, _ in METHOD_VALUES])
def test_a_method_checks_its_own_flags(rlhf_type, flags, named):
    args = parse_args("rlhf", [*BASE, "--rlhf_type", rlhf_type, "--per_device_train_batch_size", "2", *flags])
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        recipe.configure(args)


def test_flag_errors_come_before_torch_is_imported():
    """`tunesmith sft --lora_rank 0` answers at once (exit 2, a usage error): the checks run before torch (seconds to import) is loaded."""
    import subprocess
    import sys
    code = ("import sys; from tunesmith.cli import main; rc = main(['sft', '--model', 'm', '--dataset', 'd.jsonl', "
            "'--lora_rank', '0']); print(rc, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "False"] and "--lora_rank 0" in out.stderr



def test_an_adapter_checkpoint_given_as_the_model_is_a_flag_problem(tiny_models, tmp_path):
    from tunesmith.train import recipe

    ckpt = tmp_path / "checkpoint-5"
    ckpt.mkdir()
    (ckpt / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="is a LoRA adapter checkpoint, not a model: .*--adapters"):
        recipe.configure(parse_args("sft", ["--model", str(ckpt), "--dataset", "x.jsonl"]))


def test_a_missing_model_with_an_adapter_names_the_adapters_base(tmp_path):
    """--adapters CKPT without --model: training reads no settings from a checkpoint, but the message names the
    base model the adapter's args.json records, so the fix is one copy-paste."""
    import json

    from tunesmith.config.parser import parse_args
    from tunesmith.train.config import problems

    (tmp_path / "args.json").write_text(json.dumps({"model": "Qwen/Qwen2.5-7B-Instruct"}))
    (tmp_path / "adapter_config.json").write_text("{}")
    found = problems(parse_args("rlhf", ["--adapters", str(tmp_path), "--dataset", "x.jsonl"]))
    assert any(p.endswith("add --model Qwen/Qwen2.5-7B-Instruct") for p in found), found


def _checkpoint(path, **saved):
    import json

    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(path / "adapter_model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (path / name).write_bytes(b"x")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    (path / "args.json").write_text(json.dumps({"model": "some/model", "train_type": "lora", "lora_rank": 8,
                                                "target_modules": ["all-linear"], "use_dora": False,
                                                "quant_bits": None, "modules_to_save": [], "rlhf_type": None,
                                                **saved}))
    return str(path)


RESUME_STATES = [  # (how the checkpoint differs, flags of the resuming run, what the message must say)
    ("missing", [], "no such checkpoint directory"),
    ("tmp", [], "an unfinished save that a stopped run left behind"),
    ("model_dir", [], "not a training checkpoint (no trainer_state.json)"),
    ("diverged", [], "its weights gave a non-finite loss at step 4 (diverged.json)"),
    ("rank", ["--lora_rank", "16"], "the checkpoint has --lora_rank 8, this run --lora_rank 16"),
    ("full", ["--train_type", "full"], "the checkpoint has --train_type lora, this run --train_type full"),
    ("method", [], "a sft checkpoint, but this run trains dpo"),
    ("model", [], "the checkpoint was trained from --model some/model, this run loads other/bigger-model"),
    ("no_optimizer", [], "optimizer.pt is missing (a checkpoint saved with --save_only_model?); pass "
                         "--resume_only_model true"),
    ("bad_state", [], "trainer_state.json is damaged"),
    ("no_weights", [], "no weights in it (*.safetensors)"),
    ("bad_weights", [], "adapter_model.safetensors is damaged"),
    ("no_args", [], "args.json is missing"),
    ("max_steps_below", ["--max_steps", "2"], "the checkpoint is at step 3 and --max_steps 2 ends before it, so "
                                              "there is nothing left to train"),
    ("max_steps_equal", ["--max_steps", "3"], "the checkpoint is at step 3 and --max_steps 3 ends there, so there "
                                              "is nothing left to train (a resumed run counts on from the "
                                              "checkpoint's step). To train on, give --max_steps above 3"),
]


@pytest.mark.parametrize("state,flags,fragment", RESUME_STATES, ids=[s for s, _, _ in RESUME_STATES])
def test_resume_checks_the_checkpoint_before_anything_loads(tmp_path, state, flags, fragment):
    """--resume_from_checkpoint must be a complete checkpoint of the same kind of run; each mismatch is a flag
    problem naming both sides (they used to be tracebacks: a model folder, a leftover .tmp- save, another rank)."""
    import json

    from tunesmith.errors import FlagError

    ckpt = str(tmp_path / "run" / "checkpoint-3")
    if state == "tmp":
        ckpt = _checkpoint(tmp_path / "run" / ".tmp-checkpoint-3-12345")
    elif state == "model_dir":
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "config.json").write_text("{}")
        ckpt = str(tmp_path / "m")
    elif state != "missing":
        _checkpoint(tmp_path / "run" / "checkpoint-3")
    damage = {"diverged": lambda c: (c / "diverged.json").write_text(json.dumps({"step": 4})),
              "no_optimizer": lambda c: (c / "optimizer.pt").unlink(),
              "bad_state": lambda c: (c / "trainer_state.json").write_text('{"global_st'),
              "no_weights": lambda c: (c / "adapter_model.safetensors").unlink(),
              "bad_weights": lambda c: (c / "adapter_model.safetensors").write_bytes(
                  (c / "adapter_model.safetensors").read_bytes()[:20]),
              "no_args": lambda c: (c / "args.json").unlink()}
    if state in damage:
        damage[state](tmp_path / "run" / "checkpoint-3")
    command = "rlhf" if state == "method" else "sft"
    model = "other/bigger-model" if state == "model" else "some/model"
    args = parse_args(command, ["--model", model, "--dataset", "d.jsonl", "--resume_from_checkpoint", ckpt, *flags])
    import re

    with pytest.raises(FlagError, match=re.escape(fragment)):
        recipe.configure(args)


def test_resume_with_max_steps_above_the_checkpoint_or_weights_only_is_fine(tmp_path):
    """--max_steps above the checkpoint's step trains on; --resume_only_model with --ignore_data_skip counts from
    step 0, so a small --max_steps is not refused there."""
    ckpt = _checkpoint(tmp_path / "run" / "checkpoint-3")
    base = ["--model", "some/model", "--dataset", "d.jsonl", "--resume_from_checkpoint", ckpt]
    recipe.configure(parse_args("sft", [*base, "--max_steps", "4"]))
    recipe.configure(parse_args("sft", [*base, "--max_steps", "2", "--resume_only_model", "true",
                                        "--ignore_data_skip", "true"]))


@pytest.mark.slow
def test_unfinished_saves_of_dead_runs_are_removed_at_start(tiny_models, tmp_path, capsys):
    """A run killed while writing a checkpoint leaves `.tmp-checkpoint-N-PID`; the next run in that output folder
    removes those whose process is gone (and says so), and keeps one a live process is writing."""
    import os

    out = tmp_path / "out"
    dead = out / "v0-old" / ".tmp-checkpoint-5-999999999"
    alive = out / "v0-old" / f".tmp-checkpoint-6-{os.getppid()}"
    for d in (dead, alive):
        d.mkdir(parents=True)
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n' * 4)
    recipe.main(parse_args("sft", ["--model", tiny_models("qwen2"), "--dataset", str(data), "--max_steps", "1",
                                   "--report_to", "none", "--output_dir", str(out), "--save_strategy", "no"]))
    assert not dead.exists() and alive.exists()
    assert "removed 1 unfinished checkpoint save(s)" in capsys.readouterr().err


@pytest.mark.parametrize("argv,fragment", [
    (["infer", "--temperature", "nan"], "--temperature nan"),
    (["infer", "--top_p", "0"], "--top_p 0.0"),
    (["infer", "--max_new_tokens", "-3"], "--max_new_tokens -3"),
    (["infer", "--n", "0", "--num_beams", "0"], "2 problems with the flags"),
    (["deploy", "--port", "99999"], "--port 99999"),
    (["deploy", "--max_request_bytes", "-1"], "--max_request_bytes -1"),
    (["deploy", "--api_key", ""], "--api_key is empty"),
    (["rlhf", "--beta", "inf"], "--beta inf: beta must be a finite number > 0"),
    (["rlhf", "--loss_type", "sigmoid", "sft", "--loss_weights", "0", "0"], "all 0 trains nothing"),
    (["rlhf", "--rlhf_type", "grpo", "--reward_funcs", "format", "--reward_weights", "nan"], "--reward_weights nan"),
    (["sft", "--lr_scheduler_kwargs", '{"foo": 1}'], "--lr_scheduler_kwargs {'foo': 1}: not accepted"),
    (["sft", "--output_dir", ""], "--output_dir is empty"),
])
def test_inference_and_remaining_training_flags_exit_2_before_loading(tmp_path, capsys, argv, fragment):
    """infer and deploy check their flag values before loading the model, as training does: exit 2, one message,
    nothing written (a bad --temperature used to end in a traceback after an empty result file was made)."""
    from tunesmith.cli import main

    rc = main([argv[0], "--model", str(tmp_path / "no-model"), *(["--dataset", "d.jsonl"] if argv[0] in
                                                                   ("sft", "rlhf") else []), *argv[1:]])
    err = capsys.readouterr().err
    assert rc == 2 and fragment in err and "Traceback" not in err, err


# (command and flags, what the one message must name): flags that do not parse (a value outside the flag's
# choices, of the wrong type, an unknown flag) used to be reported one per run; now all at once, with the value
# checks' problems
PARSE_CASES = [
    (["sft", "--train_type", "foo", "--lr_scheduler_type", "bar", "--optim", "baz"],
     ["3 problems with the flags", "--train_type: 'foo' is not one of lora, full",
      "--lr_scheduler_type: 'bar' is not one of cosine, linear", "--optim: 'baz' is not one of adamw_torch"]),
    (["sft", "--torch_dtype", "float61", "--lora_rank", "0", "--learning_rate", "-1"],
     ["3 problems with the flags", "--torch_dtype: 'float61' is not one of bfloat16", "--lora_rank 0",
      "--learning_rate -1.0"]),
    (["sft", "--save_strategy", "sometimes", "--lora_rnak", "8", "--per_device_train_batch_size", "two"],
     ["3 problems with the flags", "--save_strategy: 'sometimes' is not one of steps, epoch, no, best",
      "unknown flag --lora_rnak", "Did you mean --lora_rank?",
      "--per_device_train_batch_size: expected an integer, got 'two'"]),
    (["sft", "--train_type", "longlora", "--packing", "maybe"],
     ["2 problems with the flags", "LongLoRA is not supported yet",
      "--packing: expected true or false, got 'maybe'"]),
    (["rlhf", "--rlhf_type", "dpoo", "--eval_strategy", "often", "--lora_rank", "-1"],
     ["3 problems with the flags", "--rlhf_type: 'dpoo' is not one of dpo", "--eval_strategy: 'often'",
      "--lora_rank -1"]),
    (["rlhf", "--rlhf_type", "grpo", "--reward_funcs", "format", "--advantage_estimator", "gae",
      "--importance_sampling_level", "word"],
     ["2 problems with the flags", "--advantage_estimator: 'gae'", "--importance_sampling_level: 'word'"]),
    (["infer", "--infer_backend", "foo", "--temperature", "-1"],
     ["2 problems with the flags", "--infer_backend: 'foo' is not one of pt, transformers", "--temperature -1.0"]),
    (["deploy", "--infer_backend", "tgi", "--port", "99999", "--quant_bits", "3"],
     ["3 problems with the flags", "--infer_backend: 'tgi'", "--port 99999", "--quant_bits: 3 is not one of 4, 8"]),
    (["export", "--quant_method", "xyz", "--safe_serialization", "maybe"],
     ["2 problems with the flags", "--quant_method: 'xyz' is not one of bnb",
      "--safe_serialization: expected true or false, got 'maybe'"]),
]


@pytest.mark.parametrize("argv,fragments", PARSE_CASES, ids=[" ".join(a) for a, _ in PARSE_CASES])
def test_every_flag_that_does_not_parse_is_reported_at_once(tmp_path, capsys, argv, fragments):
    """Exit 2, one message listing every problem of the command (flag, value, what is allowed), nothing written."""
    from tunesmith.cli import main

    out = tmp_path / "out"
    training = ["--dataset", "d.jsonl", "--output_dir", str(out)] if argv[0] in ("sft", "rlhf") else []
    rc = main([argv[0], "--model", str(tmp_path / "no-model"), *training, *argv[1:]])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert err.count("error:") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_flag_problems_are_found_before_torchrun_starts(tmp_path, capsys, monkeypatch):
    """Under NPROC_PER_NODE the launcher refuses them once, before starting the processes."""
    from tunesmith.cli import main

    monkeypatch.setenv("NPROC_PER_NODE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    rc = main(["sft", "--model", "m", "--dataset", "d.jsonl", "--train_type", "foo", "--optim", "baz"])
    err = capsys.readouterr().err
    assert rc == 2 and "2 problems with the flags" in err and "launching" not in err, err


@pytest.mark.parametrize("env, message", [
    ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000: must be a whole number from 1 to 65535 (a TCP port"),
    ({"MASTER_PORT": "port"}, "MASTER_PORT=port: must be a whole number from 1 to 65535"),
    ({"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK=2: must be a whole number from 0 to 1"),
    ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE=two: must be a whole number of at least 0"),
])
def test_launch_variables_out_of_range_are_one_clear_error(tmp_path, env, message):
    """ms-swift's launch variables that torchrun could not use: exit 2 with what the variable must be, no
    traceback (MASTER_PORT above 65535 was an OverflowError)."""
    import os
    import subprocess
    import sys

    run_env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "MASTER_PORT", "NNODES", "NODE_RANK")}
    run_env.update({"NPROC_PER_NODE": "2", "PYTHONPATH": os.getcwd(), **env})
    out = subprocess.run([sys.executable, "-m", "tunesmith", "sft", "--model", "m", "--dataset", "d.jsonl"],
                         capture_output=True, text=True, env=run_env, cwd=tmp_path)
    assert out.returncode == 2 and f"tunesmith sft: error: {message}" in out.stderr, out.stderr[-1500:]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("flags,said", [
    (["--train_type", "full", "--lora_rank", "16", "--target_modules", "q_proj"],
     "--train_type full trains every weight: --lora_rank, --target_modules have no effect"),
    (["--packing", "true", "--padding_free", "true"], "--packing already trains without padding"),
])
def test_combinations_ms_swift_accepts_are_said_not_silent(capsys, flags, said):
    """Settings that make each other moot, which ms-swift accepts: the run goes on and says what has no effect."""
    recipe.configure(parse_args("sft", [*BASE, *flags]))
    assert said in capsys.readouterr().err


def test_resuming_on_another_process_count_is_refused_unless_the_data_position_is_dropped(tmp_path, monkeypatch):
    """A checkpoint's data position counts each process's batches: a resume on another process count (a review
    found its losses off) is a flag problem naming both counts, unless --ignore_data_skip true."""
    from tunesmith.train.config import problems

    ckpt = _checkpoint(tmp_path / "checkpoint-3", world_size=2)
    base = ["--model", "some/model", "--dataset", "x.jsonl", "--resume_from_checkpoint", ckpt]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    found = problems(parse_args("sft", base))
    assert any("saved by a run on 2 processes, this run has 1" in p for p in found), found
    assert not any("processes" in p for p in problems(parse_args("sft", [*base, "--ignore_data_skip", "true"])))
    monkeypatch.setenv("NPROC_PER_NODE", "2")  # what the launcher will start
    assert not any("processes" in p for p in problems(parse_args("sft", base)))


@pytest.mark.parametrize("command", ["sft", "rlhf", "dpo", "infer", "deploy", "export", "eval", "data", "report"])
def test_every_commands_parsed_arguments_are_frozen(command):
    """No command changes its parsed arguments after parsing: what a checkpoint fills in is a new object
    (dataclasses.replace), so each command's arguments are frozen dataclasses."""
    args = parse_args(command, [])
    field = dataclasses.fields(args)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(args, field, "changed")


def test_add_version_false_into_an_earlier_runs_folder_is_refused(tmp_path):
    """--add_version false writes into --output_dir itself: a folder that holds another run's args.json or
    logging.jsonl is refused before anything loads (the two runs' logs and checkpoints would mix), unless the run
    continues one of that folder's checkpoints; an empty folder is fine."""
    old = tmp_path / "run"
    old.mkdir()
    flags = ["--model", "m", "--dataset", "d.jsonl", "--output_dir", str(old), "--add_version", "false"]
    recipe.configure(parse_args("sft", flags))  # empty: fine
    (old / "logging.jsonl").write_text('{"loss": 1.0}\n')
    with pytest.raises(ConfigError, match=r"already holds a run \(logging.jsonl\).*--resume_from_checkpoint"):
        recipe.configure(parse_args("sft", flags))
    recipe.configure(parse_args("sft", flags[:-2]))  # a new v<N>-<time> folder inside: fine
    from tunesmith.train.config import problems

    resumed = parse_args("sft", flags + ["--resume_from_checkpoint", str(old / "checkpoint-4")])
    assert not [p for p in problems(resumed) if "already holds" in p]
