"""The command-line contract: ms-swift semantics, 3.x/4.x names, config files, clear errors."""
import json
import re
import subprocess
import sys

import pytest

from tunesmith.config.parser import ArgError, parse_args, to_record
from tunesmith.config.swift_compat import NOT_SUPPORTED_YET


def test_bool_list_dict_and_bare_flags():
    a = parse_args("sft", ["--model", "m", "--dataset", "a.jsonl", "b.jsonl#5", "--gradient_checkpointing", "false",
                           "--use_rslora", "--lora_rank", "16", "--learning_rate", "4e-4",
                           "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}', "--report_to", "tensorboard", "swanlab",
                           "--target_modules", "all-linear"])
    assert a.dataset == ["a.jsonl", "b.jsonl#5"]
    assert a.gradient_checkpointing is False and a.use_rslora is True
    assert a.lora_rank == 16 and a.learning_rate == 4e-4
    assert a.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert a.report_to == ["tensorboard", "swanlab"]


@pytest.mark.parametrize("flag", ["--train_type", "--tuner_type", "--sft_type"])
def test_renamed_tuner_flag(flag):
    assert parse_args("sft", [flag, "full"]).train_type == "full"


def test_infer_backend_pt_is_transformers():
    assert parse_args("infer", ["--infer_backend", "pt"]).infer_backend == "transformers"


def test_defaults_follow_ms_swift():
    a = parse_args("sft", [])
    assert (a.lora_rank, a.lora_alpha, a.lora_dropout) == (8, 32, 0.05)
    assert (a.adam_beta2, a.weight_decay, a.logging_steps, a.lr_scheduler_type) == (0.95, 0.1, 5, "cosine")
    assert a.gradient_checkpointing is True and a.split_dataset_ratio == 0.0 and a.load_from_cache_file is False
    assert a.per_device_train_batch_size == 1 and a.report_to == ["tensorboard"] and a.target_modules == ["all-linear"]
    assert parse_args("rlhf", []).rpo_alpha is None


def test_unknown_flag_names_nearest():
    with pytest.raises(ArgError, match=r"unknown flag --lora_rnak .*Did you mean --lora_rank\?"):
        parse_args("sft", ["--lora_rnak", "8"])


def test_not_supported_yet_is_an_error_not_ignored():
    with pytest.raises(ArgError, match="does not support yet"):
        parse_args("sft", ["--galore_quantization", "true"])  # Q-GaLore: a CUDA-only 8-bit optimiser


def test_unique_prefix_accepted_like_argparse():
    assert parse_args("sft", ["--num_train_ep", "2"]).num_train_epochs == 2.0


def test_bad_values():
    with pytest.raises(ArgError, match="expected an integer"):
        parse_args("sft", ["--lora_rank", "eight"])
    with pytest.raises(ArgError, match="not one of"):
        parse_args("sft", ["--train_type", "qlora"])
    with pytest.raises(ArgError, match="expected true or false"):
        parse_args("sft", ["--use_dora", "maybe"])
    with pytest.raises(ArgError, match="JSON object"):
        parse_args("sft", ["--columns", "{bad"])


def test_config_files_and_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model: from-file\nlora_rank: 4\ndataset: [a.jsonl]\ntuner_type: full\n")
    a = parse_args("sft", [str(y), "--lora_rank", "16"])
    assert (a.model, a.lora_rank, a.dataset, a.train_type) == ("from-file", 16, ["a.jsonl"], "full")
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"model": "j", "num_train_epochs": 2}))
    a = parse_args("sft", ["--config", str(j)])
    assert a.model == "j" and a.num_train_epochs == 2.0
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rnak: 3\n")
    with pytest.raises(ArgError, match=r"bad.yaml: unknown flag --lora_rnak.*--lora_rank"):
        parse_args("sft", [str(bad)])


def test_secrets_redacted_and_not_reloaded(tmp_path):
    a = parse_args("sft", ["--swanlab_token", "sk-SECRET", "--hub_token", "hf_SECRET"])
    rec = to_record(a)
    assert "SECRET" not in json.dumps(rec)
    p = tmp_path / "args.json"
    p.write_text(json.dumps(rec))
    assert parse_args("sft", [str(p)]).swanlab_token is None


# Every flag the seed tutorials use (../shared/seeds), per command: it parses, or it is a named
# "not supported yet" flag (a clear error), never silently ignored.
SEED_FLAGS = {
    "rlhf": "--rlhf_type dpo --deepspeed zero3 --model models/gpt-oss-20b --dataset dpo_data.json --train_type lora "
            "--torch_dtype bfloat16 --num_train_epochs 1 --per_device_train_batch_size 2 "
            "--per_device_eval_batch_size 1 --learning_rate 4e-4 --lora_rank 8 --lora_alpha 32 "
            "--target_modules all-linear --gradient_accumulation_steps 4 --save_strategy epoch --save_total_limit 5 "
            "--logging_steps 5 --max_length 8192 --output_dir /opt/out --warmup_ratio 0.05 "
            "--dataloader_num_workers 4 --use_liger_kernel true --load_from_cache_file false "
            "--loss_scale ignore_empty_think --save_strategy epoch --model_author gxb --model_name gxb-gpt-oss-20b-dpo "
            "--report_to swanlab --swanlab_project swift-robot",
    "sft": "--deepspeed zero3 --model /root/gpt-oss-20b --dataset /root/train.json --train_type lora "
           "--torch_dtype bfloat16 --num_train_epochs 35 --per_device_train_batch_size 1 "
           "--per_device_eval_batch_size 1 --learning_rate 1e-4 --lora_rank 8 --lora_alpha 32 "
           "--target_modules all-linear --gradient_accumulation_steps 16 --eval_steps 50 --save_steps 50 "
           "--save_total_limit 2 --logging_steps 5 --max_length 8192 --output_dir output --warmup_ratio 0.05 "
           "--dataloader_num_workers 4 --use_liger_kernel true --load_from_cache_file false "
           "--loss_scale ignore_empty_think --save_strategy epoch --model_author gxb "
           "--model_name gxb-gpt-oss-20b-agent-distill --report_to swanlab --swanlab_project swift-robot "
           "--model openai-mirror/gpt-oss-20b --dataset CodyWhy/mh-sharegpt-20250820 --router_aux_loss_coef 1e-3 "
           "--lora_rank 16 --lora_alpha 64 --eval_steps 100 --save_steps 100 --save_total_limit 3 "
           "--logging_steps 20 --max_length 3072 --warmup_ratio 0.1 --dataloader_num_workers 8 "
           "--swanlab_token TOKEN --swanlab_project P --swanlab_mode cloud --swanlab_exp_name gpt-oss-20b-sft-v1",
    "export": "--adapters v0-20250812-150539/checkpoint-20 --merge_lora true --ckpt_dir ckpt "
              "--safe_serialization true --max_shard_size 2GB --output_dir ./export/x",
    "infer": "--model v0/checkpoint-20-merged --val_dataset val.json --max_new_tokens 2048 --result_path dpo.jsonl "
             "--adapters v0/checkpoint-551 --stream true --temperature 0",
    "deploy": "--model_dir ./export/x --infer_backend lmdeploy --served_model_name gpt-oss-20b-sft-v1 --tp 1 "
              "--cache-max-entry-count 0 --session-len 2048 --max_batch_size 1",
}


@pytest.mark.parametrize("command", sorted(SEED_FLAGS))
def test_every_seed_flag_parses(command):
    tokens = SEED_FLAGS[command].split()
    names = [t for t in tokens if t.startswith("--")]
    supported = []
    i = 0
    while i < len(tokens):  # split into (flag, values) groups
        j = i + 1
        while j < len(tokens) and not tokens[j].startswith("--"):
            j += 1
        flag = tokens[i][2:].replace("-", "_")
        if flag in NOT_SUPPORTED_YET:
            with pytest.raises(ArgError, match="does not support yet"):
                parse_args(command, tokens[i:j])
        else:
            supported += tokens[i:j]
        i = j
    parse_args(command, supported)
    assert len(names) > 3


def test_help_is_fast_and_lists_commands():
    out = subprocess.run([sys.executable, "-m", "tunesmith", "--help"], capture_output=True, text=True, check=True)
    assert "sft" in out.stdout and "data" in out.stdout
    r = subprocess.run([sys.executable, "-c", "import sys, tunesmith.cli; "
                        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"],
                       capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"  # heavy libraries are imported lazily


def test_cli_error_exit_code():
    r = subprocess.run([sys.executable, "-m", "tunesmith", "sft", "--lora_rnak", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and re.search(r"Did you mean --lora_rank", r.stderr)
    r = subprocess.run([sys.executable, "-m", "tunesmith", "pt", "--model", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and "--dataset" in r.stderr  # pt is a command now (#32): its flags are checked


def _sources_outside_args() -> str:
    import glob
    import os

    import tunesmith
    root = os.path.dirname(tunesmith.__file__)
    # the modules that declare and parse the flags (config/args.py before it was split) do not count as readers
    defining = {os.path.join(root, "config", f) for f in ("groups.py", "swift_compat.py", "commands.py", "parser.py")}
    files = [f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True) if f not in defining]
    return "\n".join(open(f, encoding="utf-8").read() for f in files)


@pytest.mark.slow
def test_every_flag_has_help_and_is_read_or_listed_as_compatibility_only():
    import dataclasses

    from tunesmith.config.commands import COMMAND_ARGS
    from tunesmith.config.swift_compat import COMPATIBILITY_ONLY

    fields = {f.name: f for cls in COMMAND_ARGS.values() for f in dataclasses.fields(cls)}
    assert not [n for n, f in fields.items() if not f.metadata.get("help")], "flags without help text"
    src = _sources_outside_args()

    def read(name):  # args.name, getattr(args, "name", ...) or a keyword of the same name from args; a transformers
        # config's attribute of the same name (`config.model_type`, getattr(config, "model_type")) is not the flag
        return re.search(rf"(?<!config)\.{name}\b|getattr\((?!config\b)\w+, [\"']{name}[\"']", src) is not None

    unread = sorted(n for n in fields if not read(n) and n not in COMPATIBILITY_ONLY)
    assert unread == [], f"flags no code reads: read them or add them to COMPATIBILITY_ONLY: {unread}"
    stale = sorted(n for n in COMPATIBILITY_ONLY if n not in fields or read(n))
    assert stale == [], f"COMPATIBILITY_ONLY lists flags that do not exist or are read: {stale}"


def test_help_shows_the_compatibility_only_table():
    out = subprocess.run([sys.executable, "-m", "tunesmith", "sft", "--help"], capture_output=True, text=True,
                         check=True).stdout
    table = out[out.index("compatibility only"):]
    assert "--model_type" in table and "config.json" in table and "--acc_strategy" in table
    assert "--lora_dtype" not in table  # it does something
    out = subprocess.run([sys.executable, "-m", "tunesmith", "deploy", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--vllm_reasoning_parser" in out[out.index("compatibility only"):]


def test_lora_dtype_names_follow_ms_swift():
    assert parse_args("sft", ["--lora_dtype", "bf16"]).lora_dtype == "bfloat16"
    assert parse_args("sft", ["--lora_dtype", "float16"]).lora_dtype == "float16"
    assert parse_args("sft", []).lora_dtype is None
    with pytest.raises(ArgError, match="lora_dtype"):
        parse_args("sft", ["--lora_dtype", "int8"])
