"""Reward-model training (`tunesmith rlhf --rlhf_type rm`): the Bradley–Terry loss equals a hand computation, a
tiny model learns to rank chosen over rejected (validation accuracy and loss), the checkpoint loads in transformers
and scores a held-out pair the right way round, and GRPO takes it as --reward_model."""
import glob
import math
import os
from types import SimpleNamespace

import pytest

from conftest import read_jsonl, write_jsonl
from tunesmith.config.parser import parse_args
from tunesmith.train import recipe


pytestmark = pytest.mark.usefixtures("no_charts")


def test_bradley_terry_loss_and_centering_equal_a_hand_computation():
    import torch

    from tunesmith.train.methods.rm import RewardModel, rm_loss, rm_metrics

    scores = torch.tensor([[1.5], [-0.5], [0.25], [0.75]], dtype=torch.float64)  # chosen 1.5, -0.5; rejected .25, .75

    def model(input_ids, attention_mask, use_cache):
        return SimpleNamespace(logits=scores)

    batch = {"input_ids": None, "attention_mask": None, "n_pairs": 2}
    terms, st = rm_loss(RewardModel(), model, batch)
    want = sum(-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in ((1.5, 0.25), (-0.5, 0.75)))
    assert abs(float(terms["pairs"]) - want) < 1e-6  # rewards are taken in float32
    terms, _ = rm_loss(RewardModel(center_rewards_coefficient=0.1), model, batch)
    assert abs(float(terms["pairs"]) - (want + 0.1 * ((1.5 + 0.25) ** 2 + (-0.5 + 0.75) ** 2))) < 1e-6
    m = rm_metrics(st)
    assert m["rewards/accuracies"] == 0.5 and abs(m["rewards/margins"] - ((1.25 - 1.25) / 2)) < 1e-9
    # a margin column: −log σ(r_c − r_r − m) (ms-swift's reward_trainer.py)
    terms, _ = rm_loss(RewardModel(), model, {**batch, "margin": torch.tensor([1.0, -0.5])})
    want = sum(-math.log(1 / (1 + math.exp(-(c - r - m)))) for c, r, m in ((1.5, 0.25, 1.0), (-0.5, 0.75, -0.5)))
    assert abs(float(terms["pairs"]) - want) < 1e-6


@pytest.mark.slow
def test_a_reward_model_learns_to_rank_and_serves_grpo(tiny_models, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = tiny_models("qwen2")
    pairs = [{"prompt": f"question {i}: is it good?", "chosen": "yes it is good red blue",
              "rejected": "no it is bad green"} for i in range(48)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    res = recipe.main(parse_args("rlhf", [
        "--rlhf_type", "rm", "--model", model_dir, "--dataset", data, "--split_dataset_ratio", "0.25",
        "--eval_steps", "5", "--max_steps", "15", "--per_device_train_batch_size", "4", "--learning_rate", "5e-3",
        "--logging_steps", "1", "--report_to", "none", "--output_dir", str(tmp_path / "rm")]))
    log = read_jsonl(os.path.join(res["run_dir"], "logging.jsonl"))
    train = [r for r in log if "rewards/accuracies" in r]
    evals = [r for r in log if "eval_rewards/accuracies" in r]
    assert train[0]["rewards/accuracies"] <= 0.5 and abs(train[0]["loss"] - math.log(2)) < 0.1  # untrained head: ~ln 2
    assert evals[-1]["eval_rewards/accuracies"] == 1.0 and evals[-1]["eval_loss"] < 0.1

    ckpt = res["state"].last_model_checkpoint
    tok = AutoTokenizer.from_pretrained(ckpt)
    rm = AutoModelForSequenceClassification.from_pretrained(ckpt, num_labels=1).eval()  # transformers + peft
    scores = []
    for reply in ("yes it is good red blue", "no it is bad green"):
        text = tok.apply_chat_template([{"role": "user", "content": "question 99: is it good?"},
                                        {"role": "assistant", "content": reply}], tokenize=False)
        with torch.no_grad():
            scores.append(float(rm(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0]))
    assert scores[0] > scores[1] + 1.0, scores

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"messages": [{"role": "user", "content": f"question {i}: is it good?"}]} for i in range(8)])
    grpo = recipe.main(parse_args("rlhf", [
        "--rlhf_type", "grpo", "--model", model_dir, "--dataset", prompts, "--reward_model", ckpt,
        "--num_generations", "4", "--per_device_train_batch_size", "8", "--max_completion_length", "8",
        "--max_steps", "2", "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
        "--output_dir", str(tmp_path / "grpo")]))
    logged = [r for r in read_jsonl(os.path.join(grpo["run_dir"], "logging.jsonl")) if "reward" in r]
    assert len(logged) == 2 and math.isfinite(logged[0]["rewards/reward_model/mean"])

    from tunesmith.cli import main
    from tunesmith.errors import ConfigError
    from tunesmith.train.methods.rm import RewardModelScorer
    assert main(["export", "--adapters", ckpt, "--merge_lora", "true"]) == 1  # the score head would be lost
    with pytest.raises(ConfigError, match="has no trained score head"):
        RewardModelScorer(model_dir)  # a plain language model: its head would be random
    assert glob.glob(os.path.join(grpo["run_dir"], "args.json"))


def test_a_margin_column_reaches_the_loss_through_the_encoded_store(tiny_models, tmp_path):
    """ms-swift's (and TRL's) per-pair `margin` column: read from the file, kept through encoding and the Arrow
    store, batched as `margin` [B] (0 for pairs without one); a margin that is not a finite number is a located
    data error."""
    from tunesmith.errors import DataError
    from tunesmith.train.config import check, resolve
    from tunesmith.train.methods.rm import RewardModel
    from tunesmith.train.setup import prepare_data

    rows = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad", **({"margin": i / 2} if i % 3 else {})}
            for i in range(6)]
    data = write_jsonl(tmp_path / "m.jsonl", rows)
    args = parse_args("rlhf", ["--rlhf_type", "rm", "--model", tiny_models("qwen2"), "--dataset", data,
                               "--dataset_shuffle", "false", "--output_dir", str(tmp_path / "o")])
    method = check(args, RewardModel)
    cfg = resolve(args, method, 1, cuda=False)
    prepared = prepare_data(cfg.data, cfg.model, method)
    margins = [c.margin for c, _ in prepared.train_rows]
    assert margins == [None, 0.5, 1.0, None, 2.0, 2.5]
    batch = method.batches(cfg, prepared, None, None).collate(list(prepared.train_rows)[:3])
    assert batch["margin"].tolist() == [0.0, 0.5, 1.0]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "wide"}])
    args = parse_args("rlhf", ["--rlhf_type", "rm", "--model", tiny_models("qwen2"), "--dataset", bad])
    with pytest.raises(DataError, match="bad.jsonl:1: field .margin.: expected a finite number"):
        prepare_data(resolve(args, method, 1, cuda=False).data, cfg.model, method)


@pytest.mark.parametrize("mode", ["--packing", "--padding_free"])
def test_packed_and_padding_free_rewards_equal_the_padded_ones(tiny_models, tmp_path, mode):
    """--packing / --padding_free for a reward model: each sequence is scored at its own last position through the
    same head, so the rewards, the loss (with margins) and every gradient equal the padded batch's (1e-5, fp32),
    while the batch holds no padding between sequences."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from tunesmith.train.config import check, resolve
    from tunesmith.train.methods.rm import RewardModel, rm_loss
    from tunesmith.train.setup import prepare_data

    rows = [{"prompt": f"question {i} " * (1 + i % 3), "chosen": "a good answer " * (1 + i % 4),
             "rejected": "bad " * (1 + i % 2), **({"margin": i / 4} if i % 2 else {})} for i in range(6)]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    model_dir = tiny_models("qwen2")
    results = {}
    for flags in ([], [mode, "true"]):
        args = parse_args("rlhf", ["--rlhf_type", "rm", "--model", model_dir, "--dataset", data, "--max_length", "64",
                                   "--dataset_shuffle", "false", "--output_dir", str(tmp_path / "o"), *flags])
        method = check(args, RewardModel)
        cfg = resolve(args, method, 1, cuda=False)
        prepared = prepare_data(cfg.data, cfg.model, method)
        batches = method.batches(cfg, prepared, None, None)
        units = list(batches.train)
        batch = batches.collate(units) if flags else batches.collate(list(prepared.train_rows))
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
        model.config.pad_token_id = prepared.tokenizer.pad_token_id
        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules="all-linear",
                                                 init_lora_weights=False))
        parts, stats = rm_loss(method, model, batch)
        parts["pairs"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[bool(flags)] = (float(parts["pairs"].detach()), stats, grads, batch)
    (lp, sp, gp, bp), (lk, sk, gk, bk) = results[False], results[True]
    assert bk["input_ids"].numel() < bp["input_ids"].numel()  # the padding is gone
    # packing may group the pairs in another order; each margin stays with its pair
    assert "margin" in bk and sorted(bk["margin"].tolist()) == sorted(bp["margin"].tolist())
    assert abs(lp - lk) < 1e-5 and abs(sp["margin"] - sk["margin"]) < 1e-4 and sp["correct"] == sk["correct"]
    assert gp.keys() == gk.keys() and any("score" in k for k in gp)
    for k in gp:
        assert torch.allclose(gp[k], gk[k], atol=1e-5, rtol=1e-4), k
