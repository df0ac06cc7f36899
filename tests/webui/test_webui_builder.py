"""The web UI builds the command a user would type: each method launches its own command (the GRPO tab is
`tunesmith rlhf --rlhf_type grpo`, never sft — ms-swift #5283), a form left at its defaults adds no flag, the line
shown is the argv that runs, and the forms hold every flag the command reads and no secret."""
import dataclasses
import shlex
import sys

import pytest

from tunesmith.config.commands import COMMAND_ARGS, RLHFArguments, SftArguments
from tunesmith.config.parser import parse_args, secret_fields
from tunesmith.config.swift_compat import COMPATIBILITY_ONLY, COMPATIBILITY_ONLY_IN
from tunesmith.webui.builder import METHODS, Built, build_command, build_training, method_flags, resume_argv
from tunesmith.webui.flags import command_flags, form_argv

BASE = {"model": "/models/qwen", "dataset": ["data/a.jsonl"]}


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_launches_its_own_command(method):
    built = build_training(method, BASE, "/runs")
    args = parse_args(built.command, built.argv[1:])
    if method == "sft":
        assert built.argv[:1] == ["sft"] and type(args) is SftArguments
    else:
        assert built.argv[:3] == ["rlhf", "--rlhf_type", method] and isinstance(args, RLHFArguments)
        assert args.rlhf_type == method
    assert built.process_argv()[:4] == [sys.executable, "-m", "tunesmith", built.command]


def test_the_grpo_tab_never_launches_sft():
    """ms-swift #5283: its GRPO tab ran `swift sft`. Here the method decides the command and the form cannot
    change it: a --rlhf_type typed into the form is not a field of any tab."""
    built = build_training("grpo", {**BASE, "reward_funcs": "accuracy format", "rlhf_type": "dpo"}, "/runs")
    assert built.argv[:3] == ["rlhf", "--rlhf_type", "grpo"]
    assert built.argv.count("--rlhf_type") == 1
    assert parse_args("rlhf", built.argv[1:]).reward_funcs == ["accuracy", "format"]
    assert "rlhf_type" not in {s.name for m in METHODS for s in method_flags(m)}


def test_defaults_add_no_flags_and_changes_do():
    specs = method_flags("sft")
    defaults = {s.name: s.default_text if s.kind != "bool" else s.default for s in specs}
    argv, problems = form_argv(specs, defaults)
    assert argv == [] and problems == []
    argv, _ = form_argv(specs, {**defaults, "lora_rank": "16", "packing": True, "target_modules": "q_proj v_proj",
                                "learning_rate": "", "enable_thinking": "false"})
    pairs = " ".join(argv).split("--")[1:]  # in the form's order (by flag group)
    assert sorted(p.strip() for p in pairs) == ["enable_thinking false", "lora_rank 16", "packing true",
                                                "target_modules q_proj v_proj"]
    args = parse_args("sft", argv)
    assert (args.lora_rank, args.packing, args.target_modules, args.enable_thinking, args.learning_rate) == \
        (16, True, ["q_proj", "v_proj"], False, None)


def test_output_dir_is_always_spelled_out():
    built = build_training("sft", BASE, "/runs")
    assert built.argv[-2:] == ["--output_dir", "/runs/qwen"]
    built = build_training("sft", {**BASE, "output_dir": "/runs/mine"}, "/runs")
    assert built.argv.count("--output_dir") == 1 and "/runs/mine" in built.argv


def test_the_line_shown_is_the_argv_that_runs():
    built = build_training("dpo", {**BASE, "system": "You are 'kind'; say hi", "beta": "0.2"}, "/runs", nproc=2)
    env, _, rest = built.line.partition(" ")
    assert env == "NPROC_PER_NODE=2" and built.env == {"NPROC_PER_NODE": "2"}
    assert shlex.split(rest) == ["tunesmith", *built.argv]
    assert parse_args("rlhf", built.argv[1:]).system == "You are 'kind'; say hi"


def test_values_that_would_read_as_flags_are_refused():
    built = build_training("sft", {**BASE, "dataset": ["a.jsonl", "--output_dir"], "target_modules": "'unclosed"},
                           "/runs")
    assert any("--dataset --output_dir: a value cannot begin with --" in p for p in built.problems)
    assert any(p.startswith("--target_modules: No closing quotation") for p in built.problems)


def test_forms_hold_every_flag_read_and_no_secret():
    for command in ("sft", "rlhf", "export", "eval"):
        cls = COMMAND_ARGS[command]
        names = {s.name for s in command_flags(command)}
        secrets = secret_fields(cls)
        assert not names & secrets, command
        expected = {f.name for f in dataclasses.fields(cls)} - secrets - set(COMPATIBILITY_ONLY) - \
            set(COMPATIBILITY_ONLY_IN.get(command, {}))
        compat_groups = {f for f in expected if any(f in vars(k).get("__annotations__", {}) and
                                                    k.__module__.endswith("swift_compat") for k in cls.__mro__)}
        assert names == expected - compat_groups, command
    # each method's groups: GRPO's flags only on the GRPO tab, preference flags not on the SFT tab
    assert "num_generations" in {s.name for s in method_flags("grpo")}
    assert "num_generations" not in {s.name for s in method_flags("dpo")}
    assert "beta" not in {s.name for s in method_flags("sft")}
    # GKD samples the student with GRPO's sampling flags: its tab shows them, not GRPO's others
    gkd = {s.name for s in method_flags("gkd")}
    assert {"temperature", "max_completion_length", "lmbda", "teacher_model"} <= gkd
    assert "num_generations" not in gkd


def test_every_default_round_trips_through_the_parser():
    """A field's default, as the form shows it, parses back to the same value (so an untouched form and the
    command's defaults agree)."""
    for spec in method_flags("grpo"):
        if spec.kind == "bool" or not spec.default_text:
            continue
        argv = [f"--{spec.name}", *(shlex.split(spec.default_text) if spec.kind == "list" else [spec.default_text])]
        value = getattr(parse_args("rlhf", ["--rlhf_type", "grpo", *argv]), spec.name)
        assert value == spec.default, spec.name


def test_resume_replaces_the_checkpoint():
    argv = ["sft", "--model", "m", "--resume_from_checkpoint", "old/checkpoint-5", "--max_steps", "9"]
    assert resume_argv(argv, "new/checkpoint-10") == ["sft", "--model", "m", "--max_steps", "9",
                                                      "--resume_from_checkpoint", "new/checkpoint-10"]


def test_other_commands_and_the_export_page():
    from tunesmith.webui.tasks_page import EXPORT_KINDS, eval_command, export_command, export_kinds

    built = build_command("export", {"adapters": "ckpt", "merge_lora": True})
    assert sorted(built.argv) == sorted(["export", "--adapters", "ckpt", "--merge_lora", "true"])
    assert isinstance(built, Built)
    offered = export_kinds()
    assert offered[0][0].startswith("merge LoRA") and all(k in EXPORT_KINDS for k in offered)
    built = export_command("ckpt", offered[0][0], {"output_dir": "out/merged", "gguf_quant": "q4_k_m"})
    assert built.argv == ["export", "--adapters", "ckpt", "--merge_lora", "true", "--output_dir", "out/merged"]
    assert parse_args("export", built.argv[1:]).merge_lora is True
    built = eval_command("ckpt", ["general_qa"], 4, '{"general_qa": {"local_path": "q.jsonl"}}')
    args = parse_args("eval", built.argv[1:])
    assert args.eval_dataset == ["general_qa"] and args.eval_limit == 4 and args.adapters == ["ckpt"]


def test_export_and_eval_fields_cannot_add_a_flag():
    """A field of the Export or Eval page is one flag's value: `q8_0 --exist_ok true` typed into --gguf_quant (which
    would replace an earlier export) is refused, as the Train page refuses it, and so is a flag in any field."""
    from tunesmith.webui.tasks_page import eval_command, export_command, export_kinds

    gguf = next(k[0] for k in export_kinds() if "gguf_quant" in k[3])
    with pytest.raises(ValueError, match=r"--gguf_quant --exist_ok: a value cannot begin with --"):
        export_command("ckpt", gguf, {"gguf_quant": "q8_0 --exist_ok true"})
    with pytest.raises(ValueError, match=r"--output_dir --exist_ok"):
        export_command("ckpt", gguf, {"output_dir": "--exist_ok"})
    with pytest.raises(ValueError, match=r"--adapters --model"):
        export_command("--model", gguf, {})
    with pytest.raises(ValueError, match=r"--eval_dataset --eval_limit"):
        eval_command("ckpt", ["general_qa", "--eval_limit"], 4, "")
    assert export_command("ckpt", gguf, {"gguf_quant": "q8_0 q4_k_m"}).argv[-3:] == ["--gguf_quant", "q8_0", "q4_k_m"]
