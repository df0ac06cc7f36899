"""Behaviour pinned to numbers (issue 15 item 5): QLoRA really learns, the gpt-oss router loss reaches the objective
scaled by its coefficient, and SimPO / CPO / ORPO as trained equal the papers' formulas computed by hand."""
import math
import os

import pytest
import torch

from conftest import EXAMPLES, read_jsonl, write_jsonl
from tunesmith.config.parser import parse_args
from tunesmith.data.collate import pad_collate
from tunesmith.data.encode import IGNORE, ChatEncoder
from tunesmith.data.formats import normalise_row
from tunesmith.train.methods import pairs, sft
from tunesmith.train import recipe
from tunesmith.train.reference import Reference, SeqLogps


def logged_losses(run_dir):
    return [r["loss"] for r in read_jsonl(os.path.join(run_dir, "logging.jsonl")) if "loss" in r]


# ------------------------------------------------------------------ 1. QLoRA learns

QLORA_STEPS = 12
QLORA_MAX_RATIO = 0.5  # measured last/first: 0.239, 0.188, 0.171 on --seed 0, 1, 2 (LoRA init differs per seed)


@pytest.fixture(scope="module")
def llama_with_real_logit_scale(tiny_models, tmp_path_factory):
    """The tiny llama with its (untied) output layer scaled ×10. A random tiny model's lm_head rows have norm ~0.16,
    so even a perfectly aligned final hidden state gives logits of about ±1 and the loss cannot fall far below
    ln(vocab) whatever the adapters on the hidden layers learn; a real model's head has no such ceiling. Only the
    head is changed, and the head is neither quantised nor given LoRA, so any fall in the loss is learnt by the
    LoRA adapters on the 4-bit layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_models("llama")
    out = str(tmp_path_factory.mktemp("llama_logit10"))
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


@pytest.mark.slow
def test_qlora_loss_halves_on_a_learnable_task(llama_with_real_logit_scale, tmp_path):
    """A user running `tunesmith sft --quant_method bnb --quant_bits 4` on a small task sees the loss fall, not just
    stay finite: on the 8 bundled capital-city conversations, 12 steps of LoRA on the 4-bit layers bring the last
    logged loss to at most half of the first (measured last/first on --seed 0, 1, 2: see QLORA_MAX_RATIO)."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    res = recipe.main(parse_args("sft", [
        "--model", llama_with_real_logit_scale, "--dataset", os.path.join(EXAMPLES, "capitals_messages.jsonl"),
        "--quant_method", "bnb", "--quant_bits", "4", "--max_steps", str(QLORA_STEPS), "--learning_rate", "1e-2",
        "--lr_scheduler_type", "constant", "--warmup_ratio", "0", "--per_device_train_batch_size", "8",
        "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--gradient_checkpointing", "false", "--output_dir", str(tmp_path / "q")]))
    lora = [m for m in res["model"].modules() if isinstance(m, LoraLayer)]
    assert lora and all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in lora)
    log = logged_losses(res["run_dir"])
    assert len(log) == QLORA_STEPS
    assert log[0] > 7.0  # the untrained model: no better than chance over a 2k vocabulary
    assert log[-1] <= QLORA_MAX_RATIO * log[0], log


# ------------------------------------------------------------------ 2. gpt-oss router loss

AUX_COEF = 0.5
WORDS = "red blue green black white gold pink gray".split()


def _gpt_oss_batch(tokenizer):
    rows = [{"messages": [{"role": "user", "content": "say " + " ".join(WORDS[:1 + i])},
                          {"role": "assistant", "content": " ".join(WORDS[:1 + (3 * i) % 8])}]} for i in range(4)]
    enc = ChatEncoder(tokenizer, default_loss_scale="default")
    return pad_collate([enc.encode(normalise_row(r)) for r in rows], tokenizer.pad_token_id)


def test_gpt_oss_router_aux_loss_is_added_once_scaled_by_its_coefficient(tiny_models, tmp_path):
    """`--router_aux_loss_coef c` on gpt-oss: the per-token sft objective for one fixed (padded) batch grows by
    exactly c × the model's own load-balancing loss (transformers' `aux_loss` for that batch and mask) compared with
    c = 0 — added once, neither dropped, nor scaled twice, nor weighted by the wrong token count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.models.load import load_model

    model_dir = tiny_models("gpt_oss")
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = _gpt_oss_batch(tok)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # rows of different lengths: padding is masked

    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        aux = float(plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          output_router_logits=True).aux_loss)
    assert aux > 0

    def per_token_objective(coef):
        args = parse_args("sft", ["--model", model_dir, "--dataset", "unused.jsonl",
                                  "--router_aux_loss_coef", str(coef)])
        model = load_model(args, model_dir, tok, for_training=True).eval()  # as `tunesmith sft` loads it
        with torch.no_grad():
            parts, stats = sft.token_loss(model, batch, args.router_aux_loss_coef)
        assert stats["n_tokens"] == batch["n_tokens"]
        return float(parts["tokens"]) / batch["n_tokens"]  # the loop divides by the step's trained tokens

    diff = per_token_objective(AUX_COEF) - per_token_objective(0)
    assert diff == pytest.approx(AUX_COEF * aux, abs=1e-5), (diff, aux)


@pytest.mark.slow
def test_gpt_oss_logged_sft_loss_includes_the_router_loss(tiny_models, tmp_path):
    """The same through the command line: `tunesmith sft` for one step on a 4-row dataset (one batch) logs a
    step-1 loss (before any update) that is c × aux higher with `--router_aux_loss_coef c` than with 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_models("gpt_oss")
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [{"messages": [{"role": "user", "content": "say " + " ".join(WORDS[:1 + i])},
                          {"role": "assistant", "content": " ".join(WORDS[:1 + (3 * i) % 8])}]} for i in range(4)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    batch = _gpt_oss_batch(tok)
    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        aux = float(plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          output_router_logits=True).aux_loss)

    def first_loss(coef):
        res = recipe.main(parse_args("sft", [
            "--model", model_dir, "--dataset", data, "--router_aux_loss_coef", str(coef), "--max_steps", "1",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--output_dir", str(tmp_path / f"c{coef}")]))
        return logged_losses(res["run_dir"])[0]

    diff = first_loss(AUX_COEF) - first_loss(0)
    assert diff == pytest.approx(AUX_COEF * aux, abs=1e-5), (diff, aux)


# ------------------------------------------------------------------ 3. SimPO, CPO, ORPO by hand

# per-token log-probs of the chosen and rejected completions of four pairs: an ordinary pair, a very large margin
# for chosen, a very large margin against it, and a near tie with completions of different lengths
PAIRS = [
    ([-0.5, -1.25, -0.75], [-2.0, -3.5, -1.0, -4.5, -0.5]),
    ([-0.01, -0.02], [-25.0, -30.0, -40.0]),
    ([-35.0, -20.0, -28.0, -33.0], [-0.003]),
    ([-1.0, -2.0, -3.0, -2.0], [-2.0, -2.0, -2.0]),
]


def _logsig(x):
    """log σ(x) in float64 without overflow for large |x|."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _smoothed(x, eps):
    return -(1 - eps) * _logsig(x) - eps * _logsig(-x)


def _nll_chosen(pairs):
    """Mean negative log-likelihood per chosen token over the batch (TRL's cross-entropy on the chosen side)."""
    toks = [x for c, _ in pairs for x in c]
    return -sum(toks) / len(toks)


def hand_loss(method, pairs, beta, gamma=0.0, eps=0.0, alpha=0.0):
    """The batch loss from the papers, in float64.
    SimPO (Meng et al. 2024, eq. 6): −log σ(β/|y_w| log π(y_w|x) − β/|y_l| log π(y_l|x) − γ), + cpo_alpha · NLL.
    CPO (Xu et al. 2024): −log σ(β(log π(y_w|x) − log π(y_l|x))) + cpo_alpha · NLL(y_w).
    ORPO (Hong et al. 2024): NLL(y_w) − λ log σ(log odds(y_w) − log odds(y_l)), odds = p/(1 − p), p = exp(mean
    token log-prob). Label smoothing ε (SimPO/CPO, as TRL): −(1−ε) log σ(x) − ε log σ(−x)."""
    per_pair = []
    for c, r in pairs:
        lw, ll = sum(c), sum(r)
        if method == "simpo":
            per_pair.append(_smoothed(beta / len(c) * lw - beta / len(r) * ll - gamma, eps))
        elif method == "cpo":
            per_pair.append(_smoothed(beta * (lw - ll), eps))
        elif method == "orpo":
            pw, pl = math.exp(lw / len(c)), math.exp(ll / len(r))
            log_odds = math.log(pw / (1 - pw)) - math.log(pl / (1 - pl))
            per_pair.append(-beta * _logsig(log_odds))
    weight = 1.0 if method == "orpo" else alpha
    return sum(per_pair) / len(per_pair) + weight * _nll_chosen(pairs)


def _fake_sequence_logps(pairs):
    """What pairs.sequence_logps returns for these token log-probs: [chosen_1..B, rejected_1..B]."""
    seqs = [c for c, _ in pairs] + [r for _, r in pairs]
    token_logps = torch.tensor([x for s in seqs for x in s], dtype=torch.float64)
    rows = torch.tensor([i for i, s in enumerate(seqs) for _ in s])
    return SeqLogps(logps=torch.tensor([sum(s) for s in seqs], dtype=torch.float64),
                    n=torch.tensor([len(s) for s in seqs]), logits_sum=torch.zeros(len(seqs)),
                    token_logps=token_logps, rows=rows)


SETTINGS = [  # (rlhf_type, flags, the hand formula's parameters)
    ("simpo", ["--beta", "2.0", "--simpo_gamma", "1.0", "--cpo_alpha", "0"], dict(beta=2.0, gamma=1.0)),
    ("simpo", ["--beta", "2.5", "--simpo_gamma", "0.5", "--label_smoothing", "0.1"],
     dict(beta=2.5, gamma=0.5, eps=0.1, alpha=1.0)),  # cpo_alpha's default is 1: SimPO + NLL, as ms-swift
    ("cpo", [], dict(beta=0.1, alpha=1.0)),  # the defaults: beta 0.1, cpo_alpha 1
    ("cpo", ["--beta", "0.5", "--label_smoothing", "0.2", "--cpo_alpha", "0.3"], dict(beta=0.5, eps=0.2, alpha=0.3)),
    ("orpo", [], dict(beta=0.1)),
    ("orpo", ["--beta", "1.0"], dict(beta=1.0)),
]


@pytest.mark.parametrize("rlhf_type,flags,params", SETTINGS,
                         ids=[f"{t}-{'-'.join(f[1::2]) or 'defaults'}" for t, f, _ in SETTINGS])
def test_reference_free_objective_equals_the_papers_formula(monkeypatch, rlhf_type, flags, params):
    """What `tunesmith rlhf --rlhf_type simpo|cpo|orpo` minimises for a batch — the pair term averaged over pairs
    plus the chosen-token NLL, combined as the training loop combines them — equals the published formula computed
    by hand, for fixed policy log-probs including margins of ±60 (no overflow, no saturation to the wrong side)
    and the beta / simpo_gamma / label_smoothing / cpo_alpha settings."""
    args = parse_args("rlhf", ["--rlhf_type", rlhf_type, "--model", "unused", "--dataset", "unused.jsonl", *flags])
    cfg, method = recipe.configure(args)
    objective = method.objective(Reference("none", "none (reference-free method)"), cfg)
    monkeypatch.setattr(pairs, "sequence_logps", lambda model, batch, **kw: _fake_sequence_logps(PAIRS))
    batch = {"n_pairs": len(PAIRS), "n_tokens": sum(len(c) for c, _ in PAIRS)}
    parts, _ = objective.loss(None, batch)
    units = objective.count(batch)
    got = sum(float(v) / units[k] for k, v in parts.items())  # as loop.train and evaluate_objective do
    assert math.isfinite(got)
    assert got == pytest.approx(hand_loss(rlhf_type, PAIRS, **params), abs=1e-6)


FOOD = [
    {"prompt": "Which can you eat: apple or rock?", "chosen": "The apple.", "rejected": "The rock, of course."},
    {"prompt": "Which can you eat: sand or pear?", "chosen": "The pear is sweet.", "rejected": "Sand."},
]


def _plain_pair_logps(model, tokenizer, rows, loss_scale):
    """Per-token log-probs of each pair's chosen and rejected completion tokens from a plain forward pass (full
    logits, log_softmax), over the same encoded rows as training."""
    enc = ChatEncoder(tokenizer, loss_scale=loss_scale)
    out = []
    with torch.no_grad():
        for row in rows:
            sides = []
            for e in enc.encode_pair(normalise_row(row)):
                ids, labels = torch.tensor([e.input_ids]), torch.tensor(e.labels)
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
                pos = (labels[1:] != IGNORE).nonzero().squeeze(-1) + 1
                sides.append(logp[pos - 1, labels[pos]].tolist())
            out.append(tuple(sides))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("rlhf_type,flags,params", [SETTINGS[1], SETTINGS[3], SETTINGS[5]],
                         ids=["simpo", "cpo", "orpo"])
def test_logged_reference_free_loss_equals_the_formula_end_to_end(tiny_models, tmp_path, rlhf_type, flags, params):
    """`tunesmith rlhf --rlhf_type simpo|cpo|orpo` for one step on a 2-pair dataset logs, as its step-1 loss (before
    any update, LoRA starting at the base model), the paper's formula applied to the base model's own log-probs of
    the chosen and rejected completions computed here by a plain forward pass."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_models("qwen2")
    data = write_jsonl(tmp_path / "pairs.jsonl", FOOD)
    res = recipe.main(parse_args("rlhf", [
        "--rlhf_type", rlhf_type, "--model", model_dir, "--dataset", data, *flags, "--max_steps", "1",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--gradient_checkpointing", "false",
        "--output_dir", str(tmp_path / "o")]))
    logged = logged_losses(res["run_dir"])[0]
    loss_scale = "default" if rlhf_type == "orpo" else "last_round"  # the defaults of each method (single turn)
    pairs = _plain_pair_logps(AutoModelForCausalLM.from_pretrained(model_dir).eval(),
                              AutoTokenizer.from_pretrained(model_dir), FOOD, loss_scale)
    assert logged == pytest.approx(hand_loss(rlhf_type, pairs, **params), abs=2e-5)
