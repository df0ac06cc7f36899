"""`tunesmith rlhf` / `tunesmith dpo` on tiny in-process models: exact at step 0, learns a preference, uses the right
reference, runs the seeds' command lines, and refuses the settings that cannot learn."""
import math
import os
import random

import pytest
import torch

from conftest import EXAMPLES, read_jsonl, seed_gpt_oss_dpo_argv, write_jsonl
from tunesmith.config.parser import parse_args
from tunesmith.errors import ConfigError, DataError
from tunesmith.train.methods import pairs as preference
from tunesmith.train import recipe
from tunesmith.train.reference import Reference

LN2 = math.log(2)
GOOD = "apple pear plum peach grape lemon mango melon".split()
BAD = "rock sand dust mud clay coal iron salt".split()


def food_row(good, bad, order):
    opts = f"{good} or {bad}" if order else f"{bad} or {good}"
    return {"prompt": f"Which can you eat: {opts}?", "chosen": f"The {good}.", "rejected": f"The {bad}."}


def food_data(tmp_path, n=96):
    combos = [(g, b, o) for g in GOOD for b in BAD for o in (0, 1)]
    random.Random(0).shuffle(combos)
    return write_jsonl(tmp_path / "food.jsonl", [food_row(*c) for c in combos[:n]]), combos[n:]


def rlhf(argv):
    return recipe.main(parse_args("rlhf", argv))


def log_rows(run_dir):
    return [r for r in read_jsonl(os.path.join(run_dir, "logging.jsonl")) if "rewards/accuracies" in r]


COMMON = ["--report_to", "none", "--logging_steps", "1", "--gradient_checkpointing", "false"]


@pytest.mark.slow
@pytest.mark.parametrize("train_type", ["lora", "full"])
def test_step0_loss_is_ln2_with_zero_margins(tiny_models, tmp_path, train_type):
    data, _ = food_data(tmp_path, 16)
    res = rlhf(["--model", tiny_models("qwen2"), "--dataset", data, "--train_type", train_type, "--max_steps", "1",
                "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                "--output_dir", str(tmp_path / "o"), *COMMON])
    first = log_rows(res["run_dir"])[0]
    assert first["loss"] == pytest.approx(LN2, abs=1e-6)
    assert first["rewards/margins"] == 0 and first["rewards/chosen"] == 0 and first["rewards/accuracies"] == 0
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0  # the completion mask is not empty
    assert "nll_loss" not in first  # no hidden SFT term unless asked for
    assert res["reference"].kind == ("adapter_off" if train_type == "lora" else "model")


def _pair_logps(model, tokenizer, pairs):
    """Summed completion log-probs (chosen, rejected) per pair, through the same encoder as training."""
    from tunesmith.data.encode import ChatEncoder
    from tunesmith.data.formats import normalise_row

    enc = ChatEncoder(tokenizer, loss_scale="last_round")
    rows = [preference.Pair(*enc.encode_pair(normalise_row(p))) for p in pairs]
    batch = preference.pair_collate(rows, tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        lp = preference.sequence_logps(model, batch).logps
    return lp[:len(rows)], lp[len(rows):]


@pytest.mark.slow
def test_dpo_learns_a_synthetic_preference(tiny_models, tmp_path):
    """Prefer edible answers: rewards/accuracies 0 -> >= 0.9, margins up, and held-out pairs ranked right."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    data, held = food_data(tmp_path)
    held_pairs = [food_row(*c) for c in held]
    model_dir = tiny_models("qwen2")
    tok = AutoTokenizer.from_pretrained(model_dir)
    c0, r0 = _pair_logps(AutoModelForCausalLM.from_pretrained(model_dir), tok, held_pairs)
    res = rlhf(["--model", model_dir, "--dataset", data, "--max_steps", "30", "--per_device_train_batch_size", "8",
                "--gradient_accumulation_steps", "1", "--learning_rate", "5e-3", "--lr_scheduler_type", "constant",
                "--output_dir", str(tmp_path / "o"), *COMMON])
    log = log_rows(res["run_dir"])
    assert log[0]["rewards/accuracies"] == 0.0 and log[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert log[-1]["rewards/accuracies"] >= 0.9
    assert log[-1]["rewards/margins"] > log[0]["rewards/margins"] + 0.2
    assert log[-1]["loss"] < 0.6
    c1, r1 = _pair_logps(res["model"], tok, held_pairs)
    assert float(((c1 - c0) > (r1 - r0)).float().mean()) >= 0.9  # the implicit reward ranks chosen first
    # and the model's own likelihood moves the same way
    assert float((c1 > r1).float().mean()) >= float((c0 > r0).float().mean()) + 0.25


@pytest.mark.slow
def test_sft_adapter_is_the_reference(tiny_models, tmp_path):
    """SFT LoRA -> DPO with --adapters: the reference log-probs at step 0 are the SFT model's, not the base's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tunesmith.train import recipe

    model_dir = tiny_models("qwen2")
    sft_data = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": [{"role": "user", "content": f"Which can you eat: {g} or {b}?"},
                      {"role": "assistant", "content": f"The {g}."}]} for g in GOOD for b in BAD[:2]])
    s = recipe.main(parse_args("sft", ["--model", model_dir, "--dataset", sft_data, "--max_steps", "8",
                                    "--learning_rate", "1e-2", "--per_device_train_batch_size", "4",
                                    "--gradient_accumulation_steps", "1", "--output_dir", str(tmp_path / "s"),
                                    "--report_to", "none", "--lora_dropout", "0.1"]))
    ckpt = s["state"].last_model_checkpoint
    pairs = [food_row(g, b, 1) for g, b in zip(GOOD, BAD)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    res = rlhf(["--model", model_dir, "--adapters", ckpt, "--dataset", data, "--max_steps", "1",
                "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
                "--dataset_shuffle", "false", "--output_dir", str(tmp_path / "d"), *COMMON])
    assert res["reference"].kind == "ref_adapter"
    first = log_rows(res["run_dir"])[0]
    tok = AutoTokenizer.from_pretrained(model_dir)
    sft_c, sft_r = _pair_logps(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), ckpt),
                               tok, pairs)
    base_c, _ = _pair_logps(AutoModelForCausalLM.from_pretrained(model_dir), tok, pairs)
    # policy == reference == the SFT model at step 0: rewards 0, loss ln 2, logps those of the SFT model
    assert first["loss"] == pytest.approx(LN2, abs=1e-6) and first["rewards/margins"] == 0
    assert first["logps/chosen"] == pytest.approx(float(sft_c.mean()), abs=1e-3)
    assert first["logps/rejected"] == pytest.approx(float(sft_r.mean()), abs=1e-3)
    assert abs(float(base_c.mean()) - float(sft_c.mean())) > 1.0  # the base would have been a different reference
    saved = os.listdir(res["state"].last_model_checkpoint)
    assert "adapter_model.safetensors" in saved and "ref" not in saved  # only the trained adapter is saved


@pytest.mark.slow
def test_precomputed_reference_gives_the_same_run(tiny_models, tmp_path):
    data, _ = food_data(tmp_path, 16)
    base = ["--model", tiny_models("qwen2"), "--dataset", data, "--max_steps", "4", "--train_type", "full",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
            *COMMON]
    live = rlhf(base + ["--output_dir", str(tmp_path / "a")])
    cached = rlhf(base + ["--output_dir", str(tmp_path / "b"), "--precompute_ref_log_probs", "true"])
    assert cached["reference"].kind == "cached" and cached["reference"].model is None
    la, lb = log_rows(live["run_dir"]), log_rows(cached["run_dir"])
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], abs=1e-5)
    assert [r["rewards/margins"] for r in la] == pytest.approx([r["rewards/margins"] for r in lb], abs=1e-5)


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch_with_nll_term(tiny_models, tmp_path):
    """Pairs and NLL tokens are both normalised over the whole step: 2x4 == 8x1 (rpo_alpha mixes an NLL in)."""
    data, _ = food_data(tmp_path, 16)
    base = ["--model", tiny_models("qwen2"), "--dataset", data, "--max_steps", "3", "--train_type", "full",
            "--learning_rate", "1e-3", "--rpo_alpha", "0.5", "--max_grad_norm", "0", *COMMON]
    a = rlhf(base + ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4",
                     "--output_dir", str(tmp_path / "a")])
    b = rlhf(base + ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
                     "--output_dir", str(tmp_path / "b")])
    la, lb = log_rows(a["run_dir"]), log_rows(b["run_dir"])
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], abs=1e-5)
    assert [r["nll_loss"] for r in la] == pytest.approx([r["nll_loss"] for r in lb], abs=1e-5)
    # the logged total is the preference part plus rpo_alpha * nll, each visible on its own
    assert la[0]["loss"] == pytest.approx(la[0]["pref_loss"] + 0.5 * la[0]["nll_loss"], abs=1e-5)
    assert la[0]["pref_loss"] == pytest.approx(LN2, abs=1e-6)


@pytest.mark.slow
def test_loss_type_list_with_weights(tiny_models, tmp_path):
    """MPO-style mix: at step 0 sigmoid = ln2 and bco_pair = 2 ln2, plus the weighted NLL of the sft type."""
    data, _ = food_data(tmp_path, 8)
    res = rlhf(["--model", tiny_models("qwen2"), "--dataset", data, "--max_steps", "1", "--loss_type", "sigmoid",
                "bco_pair", "sft", "--loss_weights", "0.8", "0.2", "1.0", "--per_device_train_batch_size", "8",
                "--gradient_accumulation_steps", "1", "--output_dir", str(tmp_path / "o"), *COMMON])
    first = log_rows(res["run_dir"])[0]
    assert first["pref_loss"] == pytest.approx(0.8 * LN2 + 0.2 * 2 * LN2, abs=1e-6)
    assert first["loss"] == pytest.approx(first["pref_loss"] + first["nll_loss"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("rlhf_type", ["simpo", "orpo", "cpo", "kto"])
def test_other_methods_train(tiny_models, tmp_path, rlhf_type):
    data, _ = food_data(tmp_path, 32)
    res = rlhf(["--model", tiny_models("qwen2"), "--rlhf_type", rlhf_type, "--dataset", data, "--max_steps", "12",
                "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--learning_rate", "5e-3",
                "--lr_scheduler_type", "constant", "--output_dir", str(tmp_path / "o"), *COMMON])
    log = [r for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "rewards/margins" in r]
    assert log[-1]["rewards/margins"] > log[0]["rewards/margins"]
    if rlhf_type == "kto":
        # no reward yet and a KL estimate of 0: every example's loss is 1 - σ(0) = 0.5
        assert log[0]["loss"] == pytest.approx(0.5, abs=1e-6) and log[0]["kl"] == 0
        assert res["reference"].kind == "adapter_off"
    else:
        assert res["reference"].kind == "none" and "nll_loss" in log[0]
        assert log[-1]["loss"] < log[0]["loss"]


# ------------------------------------------------------------------ the seeds' command lines

@pytest.mark.slow
def test_seed_gpt_oss_dpo_command_runs(tiny_models, tmp_path, capsys):
    """../shared/seeds/000: the DPO command verbatim (paths, steps changed; torchrun and --deepspeed left out)."""
    from tunesmith.cli import main
    rows = [{"messages": [{"role": "user", "content": f"Which can you eat: {g} or {b}?"},
                          {"role": "assistant", "content": f"The {g}."}], "rejected_response": f"The {b}."}
            for g in GOOD for b in BAD[:1]]
    data = write_jsonl(tmp_path / "dpo_data.json", rows)
    out = tmp_path / "gpt_output"
    rc = main(seed_gpt_oss_dpo_argv(tiny_models("gpt_oss"), data, out))
    err = capsys.readouterr().err
    assert rc == 0, err
    run_dir = next(p for p in out.iterdir() if p.name.startswith("v0-"))
    assert (run_dir / "checkpoint-1" / "adapter_model.safetensors").is_file()
    first = log_rows(str(run_dir))[0]
    assert first["rewards/accuracies"] == 0.0 and math.isfinite(first["loss"])


@pytest.mark.slow
def test_seed_ms_swift_dpo_lora_script_runs_with_prompt_chosen_rejected(tiny_models, tmp_path, capsys):
    """../shared/seeds/002 runs ms-swift's examples/train/rlhf/dpo/lora.sh with its own data; 004 has TRL's
    prompt/chosen/rejected rows. Both formats run with the script's flags (paths and steps changed)."""
    from tunesmith.cli import main
    for name in ("dpo_messages.jsonl", "dpo_prompt_chosen_rejected.jsonl"):
        out = tmp_path / name
        rc = main(["dpo", "--rlhf_type", "dpo", "--model", tiny_models("qwen2"), "--train_type", "lora",
                   "--dataset", os.path.join(EXAMPLES, name), "--load_from_cache_file", "true",
                   "--split_dataset_ratio", "0.25", "--torch_dtype", "bfloat16", "--num_train_epochs", "1",
                   "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1",
                   "--learning_rate", "1e-4", "--lora_rank", "8", "--lora_alpha", "32", "--target_modules", "all-linear",
                   "--gradient_accumulation_steps", "16", "--eval_steps", "50", "--save_steps", "50",
                   "--save_total_limit", "2", "--logging_steps", "5", "--max_length", "2048", "--output_dir", str(out),
                   "--warmup_ratio", "0.05", "--dataloader_num_workers", "4", "--rpo_alpha", "0.1",
                   "--dataset_num_proc", "4"])
        err = capsys.readouterr().err
        assert rc == 0, err
        run_dir = next(p for p in out.iterdir() if p.name.startswith("v0-"))
        log = read_jsonl(str(run_dir / "logging.jsonl"))
        assert any("eval_rewards/accuracies" in r for r in log)
        assert log_rows(str(run_dir))[0]["pref_loss"] == pytest.approx(LN2, abs=1e-6)
        assert (run_dir / "val_dataset.jsonl").is_file()


# ------------------------------------------------------------------ guards

def test_beta_zero_is_refused(tiny_models, tmp_path):
    data, _ = food_data(tmp_path, 4)
    with pytest.raises(ConfigError, match=r"beta must be a finite number > 0.*ln 2"):
        rlhf(["--model", tiny_models("qwen2"), "--dataset", data, "--beta", "0", "--output_dir", str(tmp_path)])


def test_unknown_loss_type_names_nearest(tiny_models, tmp_path):
    data, _ = food_data(tmp_path, 4)
    with pytest.raises(ConfigError, match="did you mean sigmoid"):
        rlhf(["--model", tiny_models("qwen2"), "--dataset", data, "--loss_type", "sigmod",
              "--output_dir", str(tmp_path)])


def test_rejected_identical_to_chosen_names_the_line(tiny_models, tmp_path):
    rows = [food_row("apple", "rock", 1), {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Hello."}]
    data = write_jsonl(tmp_path / "same.jsonl", rows)
    with pytest.raises(DataError, match=r"same\.jsonl:2: field 'rejected'.*identical"):
        rlhf(["--model", tiny_models("qwen2"), "--dataset", data, "--output_dir", str(tmp_path / "o")])


def test_missing_rejected_is_a_data_error(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "sft_only.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                                   {"role": "assistant", "content": "Hello"}]}])
    with pytest.raises(DataError, match=r"sft_only\.jsonl:1: field 'rejected_response'.*missing"):
        rlhf(["--model", tiny_models("qwen2"), "--dataset", data, "--output_dir", str(tmp_path / "o")])


@pytest.mark.slow
def test_prompt_filling_max_length_is_explained(tiny_models, tmp_path, capsys):
    long_prompt = {"prompt": "word " * 200, "chosen": "yes", "rejected": "no"}
    data = write_jsonl(tmp_path / "long.jsonl", [long_prompt, food_row("apple", "rock", 1)])
    res = rlhf(["--model", tiny_models("qwen2"), "--dataset", data, "--max_length", "64",
                "--truncation_strategy", "right", "--max_steps", "1", "--output_dir", str(tmp_path / "o"), *COMMON])
    assert "1 row(s) with no trained tokens dropped (the prompt fills --max_length 64" in capsys.readouterr().err
    assert log_rows(res["run_dir"])[0]["logps/chosen"] < 0
    with pytest.raises(DataError, match="no rows left to train on"):
        rlhf(["--model", tiny_models("qwen2"), "--dataset", write_jsonl(tmp_path / "l2.jsonl", [long_prompt]),
              "--max_length", "64", "--truncation_strategy", "right", "--output_dir", str(tmp_path / "o")])


def test_target_modules_matching_nothing_is_refused(tiny_models, tmp_path):
    data, _ = food_data(tmp_path, 4)
    with pytest.raises(ConfigError, match="matches no layer.*q_proj"):
        rlhf(["--model", tiny_models("qwen2"), "--dataset", data, "--target_modules", "qproj",
              "--output_dir", str(tmp_path)])


def test_ref_model_with_lora_is_refused(tiny_models, tmp_path):
    data, _ = food_data(tmp_path, 4)
    with pytest.raises(ConfigError, match="--ref_model is for full training.*--ref_adapters"):
        rlhf(["--model", tiny_models("qwen2"), "--dataset", data, "--ref_model", tiny_models("qwen2"),
              "--output_dir", str(tmp_path)])


@pytest.mark.slow
def test_reference_that_is_the_policy_is_reported(tiny_models, tmp_path, capsys):
    """If the reference moves with the policy, the loss can never leave ln 2: say so after a few steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tunesmith.data.encode import ChatEncoder
    from tunesmith.data.formats import normalise_row

    model_dir = tiny_models("qwen2")
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    args = parse_args("rlhf", ["--model", "m", "--dataset", "d.jsonl", "--gradient_accumulation_steps", "1",
                               "--learning_rate", "1e-3"])
    cfg, method = recipe.configure(args)
    objective = method.objective(Reference("model", "the policy itself", model=policy), cfg)
    enc = ChatEncoder(tok, loss_scale="last_round")
    batch = preference.pair_collate([preference.Pair(*enc.encode_pair(normalise_row(food_row("apple", "rock", 1))))],
                                    tok.pad_token_id)
    opt = torch.optim.SGD(policy.parameters(), lr=1e-3)
    for _ in range(4):
        parts, stats = objective.loss(policy, batch)
        assert parts["pairs"].item() == pytest.approx(LN2, abs=1e-6)
        parts["pairs"].backward()
        opt.step()
        opt.zero_grad()
    assert "still equal the reference's exactly" in capsys.readouterr().err
    from tunesmith.train import reference
    with pytest.raises(ConfigError, match="shares weights with the policy"):
        reference._check_separate(policy, policy)


@pytest.mark.slow
def test_resume_continues_the_same_run(tiny_models, tmp_path):
    data, _ = food_data(tmp_path, 24)
    base = ["--model", tiny_models("qwen2"), "--dataset", data, "--max_steps", "6", "--save_steps", "3",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--learning_rate", "5e-3",
            "--rpo_alpha", "0.1", *COMMON]
    whole = rlhf(base + ["--output_dir", str(tmp_path / "a")])
    ckpt = os.path.join(whole["run_dir"], "checkpoint-3")
    resumed = rlhf(base + ["--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", ckpt])
    la = {r["global_step"]: r for r in log_rows(whole["run_dir"])}
    lb = {r["global_step"]: r for r in log_rows(resumed["run_dir"])}
    assert sorted(lb) == [1, 2, 3, 4, 5, 6]  # 1-3 from the checkpoint: the whole curve
    for step in (4, 5, 6):
        assert lb[step]["loss"] == pytest.approx(la[step]["loss"], abs=1e-6)
        assert lb[step]["rewards/margins"] == pytest.approx(la[step]["rewards/margins"], abs=1e-6)


@pytest.mark.slow
def test_sync_ref_model_mixes_the_policy_into_the_reference_and_resumes_exactly(tiny_models, tmp_path):
    """TR-DPO (--sync_ref_model): every --ref_model_sync_steps steps θ_ref ← α·θ_policy + (1 − α)·θ_ref. The
    reference at the end equals that recurrence computed from the checkpoints' policy weights; each checkpoint
    carries the reference, and resuming from one reproduces the uninterrupted run's losses."""
    from safetensors.torch import load_file

    data, _ = food_data(tmp_path, 32)
    common = ["--model", tiny_models("qwen2"), "--dataset", data, "--train_type", "full", "--max_steps", "4",
              "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
              "--save_steps", "2", "--sync_ref_model", "true", "--ref_model_sync_steps", "2",
              "--ref_model_mixup_alpha", "0.5", *COMMON]
    full = rlhf([*common, "--output_dir", str(tmp_path / "a")])
    from transformers import AutoModelForCausalLM
    start = AutoModelForCausalLM.from_pretrained(tiny_models("qwen2")).state_dict()
    ref = dict(start)
    for step in (2, 4):
        policy = load_file(os.path.join(full["run_dir"], f"checkpoint-{step}", "model.safetensors"))
        ref = {k: 0.5 * policy.get(k, policy.get("model.embed_tokens.weight") if k == "lm_head.weight" else None)
               + 0.5 * v if k in policy or k == "lm_head.weight" else v for k, v in ref.items()}
        saved = load_file(os.path.join(full["run_dir"], f"checkpoint-{step}", Reference.SYNC_FILE))
        assert all(torch.allclose(saved[k], ref[k], atol=1e-6) for k in saved), step
    final = dict(full["reference"].model.named_parameters())
    assert all(torch.allclose(final[k], ref[k], atol=1e-6) for k in final)
    assert not torch.equal(final["model.norm.weight"], start["model.norm.weight"])  # it moved
    resumed = rlhf([*common, "--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint",
                    os.path.join(full["run_dir"], "checkpoint-2")])
    a = {r["global_step"]: r["loss"] for r in log_rows(full["run_dir"])}
    b = {r["global_step"]: r["loss"] for r in log_rows(resumed["run_dir"])}
    assert sorted(b) == [1, 2, 3, 4] and all(abs(a[s] - b[s]) < 1e-6 for s in b), (a, b)


@pytest.mark.parametrize("flags,message", [
    (["--train_type", "lora"], "--sync_ref_model with LoRA"),
    (["--rlhf_type", "simpo"], "simpo trains without a reference"),
    (["--precompute_ref_log_probs", "true"], "would be stale"),
    (["--ref_model_mixup_alpha", "0"], "--ref_model_mixup_alpha 0.0: expected 0 <"),
    (["--deepspeed", "zero3"], "ZeRO-3 is not supported yet"),
])
def test_sync_ref_model_needs_a_separate_reference_model(tiny_models, flags, message):
    args = parse_args("rlhf", ["--model", tiny_models("qwen2"), "--dataset", "x.jsonl", "--train_type", "full",
                               "--sync_ref_model", "true", *flags])
    with pytest.raises(ConfigError, match=message):
        recipe.configure(args)
