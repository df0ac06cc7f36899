"""Several processes on CPU (torch's gloo backend): `NPROC_PER_NODE=2 tunesmith sft|rlhf` relaunches under torchrun,
DDP reaches the same run as one process with the same global batch, DeepSpeed ZeRO-2/3 train, save adapters that
peft loads and resume, and the seeds' multi-GPU DPO command line runs. These tests start real process groups."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import (CAPITALS_DATA, EXAMPLES, free_port, launch, read_jsonl, run_dir_of, seed_gpt_oss_dpo_argv,
                      step_losses, write_jsonl)
from tunesmith.config.parser import ArgError, parse_args
from tunesmith.errors import ConfigError
from tunesmith.train import distributed as D

def _adapter(ckpt):
    from safetensors.torch import load_file
    return load_file(os.path.join(ckpt, "adapter_model.safetensors"))


def _seed_dpo_data(tmp_path):
    """16 ms-swift DPO rows (messages + rejected_response) as the seeds' dpo_data.json."""
    good, bad = "apple pear plum peach".split(), "rock sand dust mud".split()
    rows = [{"messages": [{"role": "user", "content": f"Which can you eat: {g} or {b}?"},
                          {"role": "assistant", "content": f"The {g}."}], "rejected_response": f"The {b}."}
            for g in good for b in bad]
    return write_jsonl(tmp_path / "dpo_data.json", rows)


# ------------------------------------------------------------------ settings

def test_each_rank_gets_a_disjoint_share_of_every_global_batch():
    batches = [[5, 1, 7, 3, 0, 2], [4, 6, 8]]
    shares = [D.rank_batches(batches, 2, r) for r in range(2)]
    assert shares[0] == ([[5, 1, 7], [4, 6]], 0) and shares[1] == ([[3, 0, 2], [8]], 0)
    assert D.rank_batches([[1, 2, 3, 4], [9]], 2, 1) == ([[3, 4]], 1)  # one row cannot feed two processes


def test_deepspeed_presets_are_filled_from_the_arguments():
    args = parse_args("sft", ["--model", "m", "--dataset", "d", "--per_device_train_batch_size", "2",
                              "--gradient_accumulation_steps", "4", "--max_grad_norm", "0.5"])
    for preset in D.DEEPSPEED_PRESETS:
        cfg = D.deepspeed_config(preset, args, 2, torch.bfloat16)
        assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_accumulation_steps"] == 4
        assert cfg["train_batch_size"] == 16 and cfg["gradient_clipping"] == 0.5
        assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
        assert cfg["zero_optimization"]["stage"] == int(preset[4])
    assert "offload_param" in D.deepspeed_config(preset, args, 2, torch.float32)["zero_optimization"]
    spec = json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}})
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu is 8 in the config but 2"):
        D.deepspeed_config(spec, args, 2, torch.float32)
    with pytest.raises(ConfigError, match="not a preset"):
        D.deepspeed_config("zero4", args, 2, torch.float32)


def test_launch_variables_become_torchrun_arguments(monkeypatch):
    from tunesmith.cli import _torchrun_args

    for k in ("LOCAL_RANK", "NNODES", "NODE_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NPROC_PER_NODE", "4")
    port = free_port()
    monkeypatch.setenv("MASTER_PORT", str(port))
    assert _torchrun_args("sft") == ["--nproc_per_node=4", "--nnodes=1", "--node_rank=0",
                                     "--master_addr=127.0.0.1", f"--master_port={port}"]
    assert _torchrun_args("infer") == []                    # only training is launched on several processes
    with socket.socket() as busy:
        busy.bind(("", port))
        busy.listen()
        with pytest.raises(ArgError, match=f"MASTER_PORT={port} is in use"):
            _torchrun_args("rlhf")
    monkeypatch.setenv("LOCAL_RANK", "0")                   # already a torchrun worker: run directly
    assert _torchrun_args("sft") == []


# ------------------------------------------------------------------ real process groups

@pytest.mark.slow
def test_two_ddp_processes_equal_one_process_with_the_same_global_batch(tiny_models, tmp_path):
    common = ["sft", "--model", tiny_models("qwen2"), "--dataset", *CAPITALS_DATA, "--max_steps", "4",
              "--logging_steps", "1", "--learning_rate", "5e-3", "--lora_dropout", "0",
              "--gradient_accumulation_steps", "2", "--save_steps", "4", "--report_to", "none",
              "--dataloader_num_workers", "0"]
    launch([*common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "one")], nproc=1)
    p = launch([*common, "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "two")], nproc=2)
    assert "launching: torchrun --nproc_per_node=2" in p.stderr
    assert p.stdout.count("training rows") == 1             # rank 0 speaks, the other rank is silent
    one, two = run_dir_of(str(tmp_path / "one")), run_dir_of(str(tmp_path / "two"))
    assert os.listdir(str(tmp_path / "two")) == [os.path.basename(two)]  # one run directory, not one per rank
    assert step_losses(two) == pytest.approx(step_losses(one), abs=1e-5) and len(step_losses(one)) == 4
    a, b = _adapter(os.path.join(one, "checkpoint-4")), _adapter(os.path.join(two, "checkpoint-4"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert any(float(v.abs().max()) > 0 for k, v in b.items() if "lora_B" in k)  # it trained


@pytest.mark.slow
def test_ddp_dpo_with_packed_prefix_shared_pairs_equals_one_process(tiny_models, tmp_path):
    dpo = os.path.join(EXAMPLES, "dpo_messages.jsonl")
    common = ["dpo", "--model", tiny_models("qwen2"), "--dataset", dpo, dpo, "--max_steps", "2", "--logging_steps",
              "1", "--learning_rate", "5e-3", "--lora_dropout", "0", "--gradient_accumulation_steps", "1",
              "--packing", "true", "--max_length", "256", "--rpo_alpha", "0.5", "--report_to", "none",
              "--save_strategy", "no", "--dataloader_num_workers", "0"]
    launch([*common, "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "one")], nproc=1)
    p = launch([*common, "--per_device_train_batch_size", "1", "--output_dir", str(tmp_path / "two")], nproc=2)
    assert "prefix sharing: each pair runs as one sequence" in p.stderr

    def log(name):
        return [r for r in read_jsonl(os.path.join(run_dir_of(str(tmp_path / name)), "logging.jsonl"))
                if "rewards/margins" in r]
    one, two = log("one"), log("two")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        for k in ("loss", "nll_loss", "rewards/margins", "logps/chosen"):
            assert b[k] == pytest.approx(a[k], abs=1e-5), k


@pytest.mark.slow
@pytest.mark.parametrize("stage,train_type", [("zero2", "lora"), ("zero3", "full")])
def test_deepspeed_trains_saves_a_loadable_checkpoint_and_resumes_exactly(tiny_models, tmp_path, stage, train_type):
    pytest.importorskip("deepspeed")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lr = "5e-3" if train_type == "lora" else "1e-4"
    common = ["sft", "--model", tiny_models("qwen2"), "--dataset", *CAPITALS_DATA, "--max_steps", "4",
              "--logging_steps", "1", "--learning_rate", lr, "--lora_dropout", "0",
              "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--save_steps", "2",
              "--report_to", "none", "--train_type", train_type, "--deepspeed", stage]
    launch([*common, "--output_dir", str(tmp_path / "full")])
    run = run_dir_of(str(tmp_path / "full"))
    assert os.path.isdir(os.path.join(run, "checkpoint-2", "deepspeed"))  # optimiser shards for resume
    last = os.path.join(run, "checkpoint-4")
    if train_type == "lora":
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models("qwen2")), last)
    else:  # ZeRO-3 gathered the partitioned weights: a normal Hugging Face directory
        base = AutoModelForCausalLM.from_pretrained(tiny_models("qwen2"))
        tuned = AutoModelForCausalLM.from_pretrained(last)
        assert any(not torch.equal(a, b) for a, b in zip(base.state_dict().values(), tuned.state_dict().values()))
    launch([*common, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint",
            os.path.join(run, "checkpoint-2")])
    resumed = run_dir_of(str(tmp_path / "resumed"))
    assert step_losses(resumed) == pytest.approx(step_losses(run), abs=1e-5)  # steps 1-2 come from the checkpoint
    # and the same run as one process with the same global batch: the loss is normalised over both processes
    single = [*common[:-2], "--output_dir", str(tmp_path / "one")]  # without --deepspeed
    single[single.index("--per_device_train_batch_size") + 1] = "4"
    launch(single, nproc=1)
    assert step_losses(run) == pytest.approx(step_losses(run_dir_of(str(tmp_path / "one"))), abs=1e-5)


@pytest.mark.slow
def test_seed_multi_gpu_dpo_command_runs_with_zero3(tiny_models, tmp_path):
    """../shared/seeds/000's multi-GPU DPO line: NPROC_PER_NODE=2 ... --deepspeed zero3, the other flags verbatim
    (paths and step counts changed); ZeRO-3 gathers the weights so the checkpoint is a normal PEFT directory."""
    pytest.importorskip("deepspeed")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = _seed_dpo_data(tmp_path)
    out = tmp_path / "gpt_output"
    model = tiny_models("gpt_oss")
    launch([*seed_gpt_oss_dpo_argv(model, data, out, accumulation="2", logging="1"), "--deepspeed", "zero3"],
           CUDA_VISIBLE_DEVICES="0,1")
    run = run_dir_of(str(out))
    log = [r for r in read_jsonl(os.path.join(run, "logging.jsonl")) if "rewards/accuracies" in r]
    assert len(log) == 2 and log[0]["rewards/accuracies"] == 0.0  # 16 pairs / (2 x 2 processes x 2) = 2 steps
    ckpt = os.path.join(run, "checkpoint-2")
    weights = _adapter(ckpt)
    assert weights and all(v.numel() > 0 for v in weights.values())  # gathered, not ZeRO-3's empty shards
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), ckpt)


def test_note_speaks_on_rank_zero_only(monkeypatch, capsys):
    from tunesmith import log

    monkeypatch.setenv("RANK", "1")
    log.note("hello")
    assert capsys.readouterr().err == "" and not log.is_main()
    monkeypatch.setenv("RANK", "0")
    log.note("hello")
    log.note("plain", file=sys.stdout, prefix="")
    out = capsys.readouterr()
    assert out.err == "[tunesmith] hello\n" and out.out == "plain\n" and log.is_main()
    assert D.rank is log.rank and D.is_main is log.is_main  # the rank is read in one place


def test_parallelism_describes_the_run():
    assert not hasattr(D, "Engine")  # named apart from the generation engine
    assert D.Parallelism("ddp", 2, 1).main is False and D.Parallelism("single", 1, 0).main


@pytest.mark.slow
def test_deepspeed_without_torchrun_runs_as_one_process(tiny_models, tmp_path):
    """`tunesmith sft --deepspeed zero3` started without a launcher (one GPU, as ms-swift users run ZeRO-3 offload):
    it is set up as `torchrun --nproc_per_node 1` would set it up — it used to end in DeepSpeed's mpi4py
    traceback — and trains as the plain run does."""
    pytest.importorskip("deepspeed")
    common = ["sft", "--model", tiny_models("qwen2"), "--dataset", *CAPITALS_DATA, "--max_steps", "2",
              "--logging_steps", "1", "--per_device_train_batch_size", "2", "--save_strategy", "no",
              "--report_to", "none", "--train_type", "full", "--learning_rate", "1e-4"]
    launch([*common, "--deepspeed", "zero3", "--output_dir", str(tmp_path / "ds")], nproc=1)
    launch([*common, "--output_dir", str(tmp_path / "plain")], nproc=1)
    ds, plain = step_losses(run_dir_of(str(tmp_path / "ds"))), step_losses(run_dir_of(str(tmp_path / "plain")))
    assert ds == pytest.approx(plain, abs=1e-5)


@pytest.mark.slow
def test_two_simulated_nodes_equal_one_process(tiny_models, tmp_path):
    """ms-swift's multi-node launch variables on one machine: NNODES=2, NODE_RANK=0 and 1, one process each,
    MASTER_ADDR 127.0.0.1 — the same run as one process with the same global batch; only node 0 writes."""
    common = ["sft", "--model", tiny_models("qwen2"), "--dataset", *CAPITALS_DATA, "--max_steps", "3",
              "--logging_steps", "1", "--learning_rate", "5e-3", "--lora_dropout", "0",
              "--gradient_accumulation_steps", "1", "--save_steps", "3", "--report_to", "none",
              "--dataloader_num_workers", "0"]
    launch([*common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "one")], nproc=1)
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update({"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    argv = [sys.executable, "-m", "tunesmith", *common, "--per_device_train_batch_size", "2", "--output_dir",
            str(tmp_path / "nodes")]
    nodes = [subprocess.Popen(argv, env={**env, "NODE_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=600) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), [o[1][-3000:] for o in outs]
    assert "--nnodes=2 --node_rank=1" in outs[1][1]
    one, two = run_dir_of(str(tmp_path / "one")), run_dir_of(str(tmp_path / "nodes"))
    assert os.listdir(str(tmp_path / "nodes")) == [os.path.basename(two)]
    assert step_losses(two) == pytest.approx(step_losses(one), abs=1e-5) and len(step_losses(one)) == 3


# ------------------------------------------------------------------ FSDP2

def test_fsdp_flags_read_as_ms_swift_and_transformers_write_them(tmp_path):
    """--fsdp takes transformers' option words (one string or several), ms-swift's `fsdp2` preset, or a JSON
    file/string with "fsdp" and "fsdp_config"; --fsdp_config merges over it (accelerate's fsdp_ prefix allowed).
    What tunesmith does not do is refused with the alternative, never ignored."""
    S = D.fsdp_settings
    assert S([]) is None and S(None) is None
    full = S(["full_shard auto_wrap"])
    assert full == S(["full_shard", "auto_wrap"]) and full.reshard_after_forward and full.wrap_layers
    assert not full.offload and not full.activation_checkpointing
    assert S(["shard_grad_op"]).reshard_after_forward is False and S(["shard_grad_op"]).wrap_layers is False
    assert S(["full_shard", "auto_wrap", "offload"]).offload
    preset = S(["fsdp2"])  # ms-swift 4.6's swift/config/fsdp2.json
    assert preset.wrap_layers and preset.reshard_after_forward and preset.activation_checkpointing
    f = tmp_path / "fsdp.json"
    f.write_text(json.dumps({"fsdp": "full_shard auto_wrap",
                             "fsdp_config": {"fsdp_transformer_layer_cls_to_wrap": "Qwen2DecoderLayer",
                                             "reshard_after_forward": False}}))
    from_file = S([str(f)])
    assert from_file.layer_classes == ("Qwen2DecoderLayer",) and from_file.reshard_after_forward is False
    assert S(["full_shard"], '{"activation_checkpointing": true}').activation_checkpointing
    for bad, match in [(["hybrid_shard"], "2-D|two-dimensional"), (["no_shard"], "drop --fsdp"),
                       (["full_shard", "shard_grad_op"], "choose one"), (["ful_shard"], "expected full_shard"),
                       (["{not json"], "not valid JSON")]:
        with pytest.raises(ConfigError, match=match):
            S(bad)
    for cfg, match in [('{"reshard_after_foward": true}', "did you mean 'reshard_after_forward'"),
                       ('{"fsdp_version": 1}', "FSDP2"), ('{"auto_wrap_policy": "SIZE_BASED_WRAP"}', "not supported"),
                       ('{"activation_checkpointing": "maybe"}', "true or false")]:
        with pytest.raises(ConfigError, match=match):
            S(["full_shard"], cfg)


@pytest.mark.slow
def test_fsdp_combinations_that_cannot_run_are_flag_errors(tiny_models, tmp_path):
    from tunesmith.errors import FlagError

    base = ["sft", "--model", tiny_models("qwen2"), "--dataset", CAPITALS_DATA[0], "--output_dir", str(tmp_path / "o")]
    e = os.environ.copy()
    for extra, match in [(["--fsdp", "full_shard", "--deepspeed", "zero3"], "choose one"),
                         (["--fsdp", "hybrid_shard"], "not supported yet"),
                         (["--fsdp", "full_shard", "--quant_bits", "4"], "bnb_4bit_quant_storage")]:
        p = subprocess.run([sys.executable, "-m", "tunesmith", *base, *extra], capture_output=True, text=True,
                           env=e, timeout=120)
        assert p.returncode == 2 and match in p.stderr and "Traceback" not in p.stderr, (extra, p.stderr[-2000:])
    assert not os.path.exists(tmp_path / "o")
    assert issubclass(FlagError, ConfigError)


@pytest.mark.slow
@pytest.mark.parametrize("family,train_type", [("qwen2", "lora"), ("llama", "full")])
def test_fsdp_two_processes_equal_one_and_save_loadable_checkpoints_that_resume_exactly(tiny_models, tmp_path,
                                                                                         family, train_type):
    """`--fsdp full_shard auto_wrap` on two processes (PyTorch FSDP2, gloo): the same losses and final weights as
    one process with the same global batch (1e-5), checkpoints that peft/transformers load (whole weights) with
    the optimiser state sharded (optimizer_0/), and a resume from checkpoint-2 that reproduces steps 3-4. LoRA on a
    tied-embedding Qwen2, full training of a Llama with its own output layer (trained through the chunked head)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = tiny_models(family)
    lr = "5e-3" if train_type == "lora" else "1e-4"
    common = ["sft", "--model", model, "--dataset", *CAPITALS_DATA, "--max_steps", "4", "--logging_steps", "1",
              "--learning_rate", lr, "--lora_dropout", "0", "--gradient_accumulation_steps", "2", "--save_steps",
              "2", "--report_to", "none", "--train_type", train_type, "--dataloader_num_workers", "0"]
    fsdp = ["--per_device_train_batch_size", "2", "--fsdp", "full_shard", "auto_wrap"]
    launch([*common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "one")], nproc=1)
    launch([*common, *fsdp, "--output_dir", str(tmp_path / "two")])
    one, two = run_dir_of(str(tmp_path / "one")), run_dir_of(str(tmp_path / "two"))
    assert step_losses(two) == pytest.approx(step_losses(one), abs=1e-5) and len(step_losses(two)) == 4
    assert os.path.isfile(os.path.join(two, "checkpoint-2", "optimizer_0", ".metadata"))  # every rank's shard
    assert not os.path.exists(os.path.join(two, "checkpoint-2", "optimizer.pt"))
    last = os.path.join(two, "checkpoint-4")
    from safetensors.torch import load_file
    name = "adapter_model.safetensors" if train_type == "lora" else "model.safetensors"
    a, b = load_file(os.path.join(one, "checkpoint-4", name)), load_file(os.path.join(last, name))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    if train_type == "lora":
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), last)
    else:
        tuned = AutoModelForCausalLM.from_pretrained(last)
        base = AutoModelForCausalLM.from_pretrained(model)
        assert not torch.equal(tuned.lm_head.weight, base.lm_head.weight)  # the output layer trained
    launch([*common, *fsdp, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint",
            os.path.join(two, "checkpoint-2")])
    resumed = run_dir_of(str(tmp_path / "resumed"))
    assert step_losses(resumed) == pytest.approx(step_losses(two), abs=1e-5)
    c = load_file(os.path.join(resumed, "checkpoint-4", name))
    assert all(torch.allclose(b[k], c[k], atol=1e-5) for k in b)


@pytest.mark.slow
def test_seed_multi_gpu_dpo_command_runs_with_fsdp(tiny_models, tmp_path):
    """../shared/seeds/000's multi-GPU DPO line (gpt-oss, a MoE) with `--fsdp full_shard auto_wrap` in place of
    `--deepspeed zero3`, NPROC_PER_NODE=2; the adapter it saves loads in peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = _seed_dpo_data(tmp_path)
    out = tmp_path / "gpt_output"
    model = tiny_models("gpt_oss")
    launch([*seed_gpt_oss_dpo_argv(model, data, out, accumulation="2", logging="1"), "--fsdp", "full_shard",
            "auto_wrap"], CUDA_VISIBLE_DEVICES="0,1")
    run = run_dir_of(str(out))
    log = [r for r in read_jsonl(os.path.join(run, "logging.jsonl")) if "rewards/accuracies" in r]
    assert len(log) == 2 and log[0]["rewards/accuracies"] == 0.0
    ckpt = os.path.join(run, "checkpoint-2")
    assert os.path.isdir(os.path.join(ckpt, "optimizer_0"))
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), ckpt)


def test_fsdp_review_cases_are_clear_flag_errors(tiny_models, tmp_path):
    """What a fresh-user review typed: a non-list layer class (was a TypeError traceback), a --fsdp_config that
    is no JSON object, a layer class named without auto_wrap (now wraps it, so a wrong name is an error at
    sharding), and NPROC_PER_NODE=2 with a bad value — refused before torchrun starts, exit 2, not 1."""
    S = D.fsdp_settings
    with pytest.raises(ConfigError, match="expected class names"):
        S(["full_shard"], '{"transformer_layer_cls_to_wrap": 5}')
    with pytest.raises(ConfigError, match="expected a JSON object"):
        S(["full_shard"], str(tmp_path / "missing.json"))
    assert S(["full_shard"], '{"transformer_layer_cls_to_wrap": ["NoSuchLayer"]}').wrap_layers
    base = ["sft", "--model", tiny_models("qwen2"), "--dataset", CAPITALS_DATA[0], "--output_dir", str(tmp_path / "o")]
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    e.update({"NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())})
    p = subprocess.run([sys.executable, "-m", "tunesmith", *base, "--lora_rank", "-1", "--fsdp", "hybrid_shard"],
                       capture_output=True, text=True, env=e, timeout=120)
    assert p.returncode == 2 and "launching: torchrun" not in p.stderr, p.stderr[-2000:]
    assert "lora_rank" in p.stderr and "hybrid_shard" in p.stderr and "Traceback" not in p.stderr
    assert not os.path.exists(tmp_path / "o")
