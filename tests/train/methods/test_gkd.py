"""GKD (`tunesmith rlhf --rlhf_type gkd`): the chunked generalised JSD equals TRL's GKDTrainer.generalized_jsd_loss
(values and gradients) and ms-swift's variants (top-k, output layers of different sizes); a whole micro-batch's
loss equals TRL's on the same batch and teacher; a student distilled from a differently initialised tiny teacher
moves toward it on held-out rows; --lmbda 1 trains on the engine's samples and 0 on none; a resumed run equals the
uninterrupted one; the teacher modes (LoRA's adapter switched off, a frozen copy with adapters merged, offloaded,
the student itself with --sft_alpha) run; and what GKD cannot do is a flag error."""
import json
import math
import os
import random
from types import SimpleNamespace

import pytest
import torch

from conftest import read_jsonl, train, write_jsonl
from tunesmith.config.parser import ArgError, parse_args
from tunesmith.errors import ConfigError

pytestmark = pytest.mark.usefixtures("no_charts")

WORDS = "red green blue cat dog sun moon tree river stone bird fish".split()


def _trl_jsd(student_logits, teacher_logits, labels, beta, temperature):
    """TRL 1.16's GKDTrainer.generalized_jsd_loss (reduction batchmean: the sum over the unmasked positions divided
    by their number)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDTrainer
    return GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=beta,
                                           temperature=temperature)


def _rows(n, seed):
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(4))},
                          {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(5))}]}
            for _ in range(n)]


@pytest.fixture
def setup(tiny_models, tmp_path):
    """(student, teacher: the same tiny architecture initialised with another seed, training rows, held-out rows)."""
    return (tiny_models("qwen2"), tiny_models("qwen2", seed=1), write_jsonl(tmp_path / "train.jsonl", _rows(32, 0)),
            _rows(8, 1))


def _gkd(model, teacher, data, out, *flags):
    return train("rlhf", "--rlhf_type", "gkd", "--model", model, *(["--teacher_model", teacher] if teacher else []),
                 "--dataset", data, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
                 "--max_completion_length", "8", "--logging_steps", "1", "--report_to", "none",
                 "--output_dir", str(out), *flags)


def _log(run_dir):
    return [r for r in read_jsonl(os.path.join(run_dir, "logging.jsonl")) if "jsd" in r]


# ------------------------------------------------------------------ the divergence against TRL

@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.2])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("plain", [False, True], ids=["chunked", "plain"])
def test_chunked_jsd_equals_trls_loss_and_gradient(beta, temperature, plain):
    """ChunkedJSD over hidden states and output weights (or, plain, over given logits), 3 positions per chunk, against
    TRL's function on the full logits: the same mean divergence and, by autograd, the same gradients for the
    student's hidden states and output weight (1e-5)."""
    from tunesmith.train.ops.jsd import JSDSpec, chunked_jsd
    from tunesmith.train.ops.token_logps import HeadInputs

    g = torch.Generator().manual_seed(0)
    n, hs, ht, vocab = 11, 16, 24, 40
    h = (torch.randn(n, hs, generator=g) / 2).requires_grad_()
    w = torch.randn(vocab, hs, generator=g).requires_grad_()
    th, tw = torch.randn(n, ht, generator=g) / 2, torch.randn(vocab, ht, generator=g)
    target = torch.randint(0, vocab, (n,), generator=g)
    labels = torch.where(torch.rand(n, generator=g) < 0.3, -100, target)  # TRL's mask, applied by our caller
    keep = labels != -100
    logits = h @ w.t()
    student = HeadInputs(logits[keep], None, target[keep], target, 1) if plain else \
        HeadInputs(h[keep], w, target[keep], target, 1)
    total, per, _ = chunked_jsd(student, HeadInputs(th[keep], tw, target[keep], target, 1),
                                JSDSpec(beta, temperature), chunk=3)
    ours = total / keep.sum()
    theirs = _trl_jsd(logits[None], (th @ tw.t())[None], labels[None], beta, temperature)
    assert abs(ours.item() - theirs.item()) < 1e-5, (ours.item(), theirs.item())
    assert abs((per.sum() / keep.sum()).item() - theirs.item()) < 1e-5
    for a, b in zip(torch.autograd.grad(ours, (h, w), retain_graph=True), torch.autograd.grad(theirs, (h, w))):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), float((a - b).abs().max())


def _swift_jsd(s, t, beta, temperature, topk=None):
    """ms-swift 4.6's gkd_loss on [n, V] logits, verbatim in substance (rlhf_trainers/gkd_loss.py and
    GKDTrainer._compute_jsd_loss): top-k of the teacher's raw logits with the student's gathered there, or
    `_align_vocab` (pad the narrower side with the other's logits, in place), then TRL's divergence, summed over
    the rows."""
    if topk:
        t, idx = t.topk(topk, dim=-1)
        s = s.gather(-1, idx)
    elif s.shape[-1] < t.shape[-1]:
        vs = s.shape[-1]
        s = torch.nn.functional.pad(s, (0, t.shape[-1] - vs))
        s[..., vs:] = t[..., vs:]
    elif s.shape[-1] > t.shape[-1]:
        vt = t.shape[-1]
        t = torch.nn.functional.pad(t, (0, s.shape[-1] - vt))
        t[..., vt:] = s[..., vt:]
    return _trl_jsd(s[None], t[None], None, beta, temperature)  # without labels TRL's batchmean divides by 1


@pytest.mark.parametrize("case", ["topk", "teacher wider", "student wider"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_topk_and_output_layers_of_different_sizes_follow_ms_swift(case, beta):
    """--gkd_logits_topk and a teacher whose output layer has more (Qwen2.5-7B against 0.5B) or fewer rows than the
    student's: the same sum and student-logit gradient as ms-swift's formula under autograd (1e-5)."""
    from tunesmith.train.ops.jsd import JSDSpec, generalized_jsd

    g = torch.Generator().manual_seed(1)
    vs, vt = {"topk": (30, 30), "teacher wider": (30, 34), "student wider": (34, 30)}[case]
    s = torch.randn(7, vs, generator=g).requires_grad_()
    t = torch.randn(7, vt, generator=g)
    spec = JSDSpec(beta, 0.8, topk=5 if case == "topk" else None)
    jsd, grad = generalized_jsd(s.detach(), t, spec)
    theirs = _swift_jsd(s, t, beta, 0.8, spec.topk)
    assert abs(jsd.sum().item() - theirs.item()) < 1e-5
    (ref,) = torch.autograd.grad(theirs, s)
    assert torch.allclose(grad, ref, atol=1e-5), float((grad - ref).abs().max())


def test_the_nll_term_and_a_trained_output_layer_have_autograds_gradients():
    """--sft_alpha's NLL of the target tokens (at temperature 1, the model's own loss) rides on the same chunks; a
    trained output layer gets its gradient from the forward pass's chunks (1e-5 against autograd)."""
    from tunesmith.train.ops.jsd import JSDSpec, chunked_jsd
    from tunesmith.train.ops.token_logps import HeadInputs

    g = torch.Generator().manual_seed(2)
    h = (torch.randn(9, 8, generator=g) / 2).requires_grad_()
    w = torch.randn(20, 8, generator=g).requires_grad_()
    th, tw = torch.randn(9, 8, generator=g), torch.randn(20, 8, generator=g)
    target = torch.randint(0, 20, (9,), generator=g)
    total, _, nll = chunked_jsd(HeadInputs(h, w, target, target, 1), HeadInputs(th, tw, target, target, 1),
                                JSDSpec(0.5, 0.9, nll_weight=0.3), chunk=4)
    logits = h @ w.t()
    ref = _trl_jsd(logits[None], (th @ tw.t())[None], None, 0.5, 0.9) \
        + 0.3 * torch.nn.functional.cross_entropy(logits, target, reduction="sum")
    assert abs(total.item() - ref.item()) < 1e-4
    assert torch.allclose(nll, torch.nn.functional.cross_entropy(logits, target, reduction="none"), atol=1e-5)
    for a, b in zip(torch.autograd.grad(total, (h, w)), torch.autograd.grad(ref, (h, w))):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), float((a - b).abs().max())


@pytest.mark.parametrize("train_type", ["lora", "full"])
def test_a_micro_batchs_loss_equals_trls_gkd_loss_on_the_same_batch_and_teacher(setup, train_type):
    """The method's loss on a collated batch of encoded rows (dataset replies) against TRL's compute_loss: both
    models' full logits, shifted, generalized_jsd_loss over the reply tokens; the loss and the student's gradient
    agree (1e-5). Ours never runs either model's output layer over the sequence ([tokens × vocabulary])."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.data.encode import ChatEncoder
    from tunesmith.train.methods.gkd import GKD, Distillation, gkd_collate, gkd_loss
    from tunesmith.train.reference import Reference

    model_dir, teacher_dir, data, _ = setup
    tok = AutoTokenizer.from_pretrained(model_dir)
    student = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if train_type == "lora":
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(student, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    enc = ChatEncoder(tok, default_loss_scale="last_round")
    rows = [enc.encode(r) for r in _rows(5, 3)]
    batch = gkd_collate(rows, tok.pad_token_id)
    method = GKD(beta=0.5, lmbda=0.0, temperature=0.7, max_completion_length=8)
    run = Distillation(Reference("model", "teacher", model=teacher), SimpleNamespace(on_policy=lambda: False))
    called = []
    hooks = [m.get_output_embeddings().register_forward_hook(lambda *a: called.append(1)) for m in (student, teacher)]
    parts, stats = gkd_loss(method, run, student, batch)
    for h in hooks:
        h.remove()
    assert called == []  # neither output layer ran on the whole sequence: only chunks of the reply positions
    ours = parts["micro_batches"]
    out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    theirs = _trl_jsd(out.logits[:, :-1], t_logits[:, :-1], batch["labels"][:, 1:], 0.5, 0.7)
    assert stats["tokens"] == int((batch["labels"][:, 1:] != -100).sum()) > 0
    assert abs(ours.item() - theirs.item()) < 1e-5, (ours.item(), theirs.item())
    params = [p for p in student.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(theirs, params)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), float((a - b).abs().max())


# ------------------------------------------------------------------ training

def _held_out_jsd(model, teacher_dir, tokenizer, rows) -> float:
    """The generalised JSD (β 0.5, temperature 1) from the student to the teacher over the reply tokens of rows
    it never trained on, TRL's function on the full logits."""
    from transformers import AutoModelForCausalLM

    from tunesmith.data.encode import ChatEncoder
    from tunesmith.train.methods.gkd import gkd_collate

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    batch = gkd_collate([ChatEncoder(tokenizer, default_loss_scale="last_round").encode(r) for r in rows],
                        tokenizer.pad_token_id)
    model = model.cpu().eval()
    with torch.no_grad():
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        return float(_trl_jsd(model(**kw).logits[:, :-1], teacher(**kw).logits[:, :-1], batch["labels"][:, 1:],
                              0.5, 1.0))


@pytest.mark.slow
@pytest.mark.parametrize("train_type,margin", [("full", 0.5), ("lora", 0.1)])
def test_a_student_distilled_from_a_tiny_teacher_moves_toward_it(setup, tmp_path, train_type, margin):
    """40 steps of GKD (lmbda 0.5: dataset replies and the student's own samples) from a teacher of the same tiny
    architecture initialised with another seed: on 8 held-out conversations the divergence to the teacher falls
    by at least `margin` of its starting value (measured: full 0.0064 → 0.0022, 66% lower; LoRA rank 8 on this
    64-wide model 0.0064 → 0.0054, 15% lower), and the logged training jsd falls with it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, teacher_dir, data, held = setup
    tok = AutoTokenizer.from_pretrained(model_dir)
    before = _held_out_jsd(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), teacher_dir, tok,
                           held)
    res = _gkd(model_dir, teacher_dir, data, tmp_path / "out", "--train_type", train_type, "--max_steps", "40",
               "--per_device_train_batch_size", "8", "--learning_rate", "1e-2" if train_type == "full" else "2e-2",
               "--save_strategy", "no")
    after = _held_out_jsd(res["model"], teacher_dir, tok, held)
    print(f"\nheld-out JSD to the teacher ({train_type}): {before:.5f} -> {after:.5f} "
          f"({100 * (1 - after / before):.0f}% lower)")
    assert after <= (1 - margin) * before, (before, after)
    log = _log(res["run_dir"])
    assert log[-1]["jsd"] < log[0]["jsd"] and 0 < sum(r["on_policy"] for r in log) < len(log)


@pytest.mark.slow
def test_lmbda_one_trains_on_the_engines_samples_and_zero_on_none(setup, tmp_path, monkeypatch):
    """--lmbda 1: every step's micro-batch is the student's completions, sampled by the generation engine (each one
    submitted there, and the completions log holds exactly what it returned); --lmbda 0: the engine is never
    used. The draw is ms-swift's: random.Random(seed + step).random() <= lmbda."""
    from tunesmith.inference.engine import GenerationEngine

    model_dir, teacher_dir, data, _ = setup
    returned = []
    submit = GenerationEngine.submit

    def spy(self, prompt_ids, params, adapter=None, loop=None):
        handle = submit(self, prompt_ids, params, adapter, loop)
        result = handle.result

        def recorded():
            c = result()
            returned.append(list(c.token_ids))
            return c
        handle.result = recorded
        return handle
    monkeypatch.setattr(GenerationEngine, "submit", spy)
    res = _gkd(model_dir, teacher_dir, data, tmp_path / "one", "--train_type", "lora", "--lmbda", "1",
               "--max_steps", "3", "--log_completions", "true", "--save_strategy", "no")
    log = _log(res["run_dir"])
    assert [r["on_policy"] for r in log] == [1.0] * 3 and len(returned) == 3 * 4
    assert all(r["completions/mean_length"] > 0 for r in log)
    logged = read_jsonl(os.path.join(res["run_dir"], "completions.jsonl"))
    tok = res["tokenizer"]
    assert [c["completion"] for c in logged] == [tok.decode(ids, skip_special_tokens=True) for ids in returned]
    assert [c["step"] for c in logged] == [1] * 4 + [2] * 4 + [3] * 4
    assert res["reference"].sampler.sampled == 12

    returned.clear()
    res = _gkd(model_dir, teacher_dir, data, tmp_path / "zero", "--train_type", "lora", "--lmbda", "0",
               "--max_steps", "3", "--save_strategy", "no")
    assert [r["on_policy"] for r in _log(res["run_dir"])] == [0.0] * 3 and returned == []
    assert res["reference"].sampler.sampled == 0
    draws = [random.Random(42 + s).random() <= 0.5 for s in range(6)]
    assert any(draws) and not all(draws)  # the resume test below crosses both kinds of step


@pytest.mark.slow
def test_a_resumed_gkd_run_equals_the_uninterrupted_one(setup, tmp_path):
    """lmbda 0.5 (steps 3-6 mix on-policy and dataset steps): resuming from checkpoint-2 gives the uninterrupted
    run's losses at steps 3-6 (the draws and the sampling seeds follow the step)."""
    model_dir, teacher_dir, data, _ = setup
    common = ["--train_type", "lora", "--max_steps", "6", "--save_steps", "2", "--learning_rate", "5e-3"]
    full = _gkd(model_dir, teacher_dir, data, tmp_path / "full", *common)
    on = [r["on_policy"] for r in _log(full["run_dir"])]
    assert 0 < sum(on[2:]) < 4, on
    resumed = _gkd(model_dir, teacher_dir, data, tmp_path / "resumed", *common,
                   "--resume_from_checkpoint", os.path.join(full["run_dir"], "checkpoint-2"))
    a = {r["global_step"]: r for r in _log(full["run_dir"])}
    b = {r["global_step"]: r for r in _log(resumed["run_dir"])}
    assert sorted(b) == [1, 2, 3, 4, 5, 6]  # 1-2 from the checkpoint: the whole curve
    for step in (3, 4, 5, 6):
        for key in ("loss", "jsd", "grad_norm", "on_policy"):
            assert abs(a[step][key] - b[step][key]) < 1e-6, (step, key, a[step][key], b[step][key])


@pytest.mark.slow
def test_the_teacher_modes(setup, tiny_models, tmp_path, capsys):
    """LoRA with --teacher_model equal to --model: the model with the adapter switched off (no copy; the first
    step's divergence is 0, as the adapter starts at B = 0); a full student with a frozen teacher copy with
    --teacher_adapters merged in and --offload_teacher_model; no teacher with --sft_alpha: the student itself (a
    divergence of 0) plus the NLL, logged as sft_loss; --gkd_logits_topk trains; validation logs eval_jsd; a teacher
    whose output layer has more rows than the student's trains."""
    model_dir, teacher_dir, data, held = setup
    res = _gkd(model_dir, model_dir, data, tmp_path / "off", "--train_type", "lora", "--max_steps", "2",
               "--save_steps", "2", "--learning_rate", "1e-2", "--lmbda", "0")
    assert res["reference"].teacher.kind == "adapter_off" and abs(_log(res["run_dir"])[0]["jsd"]) < 1e-6
    adapter = os.path.join(res["run_dir"], "checkpoint-2")
    res = _gkd(model_dir, model_dir, data, tmp_path / "copy", "--train_type", "full", "--max_steps", "2",
               "--teacher_adapters", adapter, "--offload_teacher_model", "true", "--gkd_logits_topk", "16",
               "--val_dataset", write_jsonl(tmp_path / "val.jsonl", held), "--eval_strategy", "steps",
               "--eval_steps", "2", "--save_strategy", "no")
    teacher = res["reference"].teacher
    assert teacher.kind == "model" and teacher.offload and next(teacher.model.parameters()).device.type == "cpu"
    assert "merged with" in teacher.describe and _log(res["run_dir"])[0]["jsd"] > 0
    assert any("eval_jsd" in r for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")))
    res = _gkd(model_dir, None, data, tmp_path / "self", "--train_type", "lora", "--max_steps", "2",
               "--sft_alpha", "0.5", "--lmbda", "0", "--save_strategy", "no")
    first = _log(res["run_dir"])[0]
    assert res["reference"].teacher.kind == "policy" and abs(first["jsd"]) < 1e-6
    assert math.isclose(first["loss"], 0.5 * first["sft_loss"], rel_tol=1e-4), first
    with open(os.path.join(res["run_dir"], "args.json"), encoding="utf-8") as fh:
        assert json.load(fh)["beta"] == 0.5  # ms-swift's GKD default, recorded as resolved
    # a teacher with more output rows than the student (padding rows, as Qwen2.5-7B's against 0.5B's) and the
    # tokenizer of the student: ms-swift's alignment
    wide = tiny_models("qwen2", seed=2, model_vocab=len(res["tokenizer"]) + 64)
    res = _gkd(model_dir, wide, data, tmp_path / "wide", "--train_type", "lora", "--max_steps", "1",
               "--save_strategy", "no")
    assert _log(res["run_dir"])[0]["jsd"] > 0


@pytest.mark.slow
def test_two_ddp_processes_train_on_their_own_samples(setup, tmp_path):
    """Under torchrun (two processes, gloo) every process draws the same on-policy steps and samples its own rows;
    the completions log is rank 0's."""
    from conftest import launch, run_dir_of

    model_dir, teacher_dir, data, _ = setup
    out = tmp_path / "ddp"
    launch(["rlhf", "--rlhf_type", "gkd", "--model", model_dir, "--teacher_model", teacher_dir, "--dataset", data,
            "--train_type", "lora", "--max_steps", "2", "--per_device_train_batch_size", "2", "--lmbda", "1",
            "--gradient_accumulation_steps", "1", "--max_completion_length", "8", "--logging_steps", "1",
            "--log_completions", "true", "--report_to", "none", "--output_dir", str(out)], nproc=2, timeout=600)
    log = _log(run_dir_of(out))
    assert [r["on_policy"] for r in log] == [1.0, 1.0] and all(math.isfinite(r["loss"]) for r in log)
    assert len(read_jsonl(os.path.join(run_dir_of(out), "completions.jsonl"))) == 2 * 2


# ------------------------------------------------------------------ what GKD refuses

@pytest.mark.slow
def test_a_teacher_with_another_vocabulary_is_refused_before_the_run_starts(setup, tiny_models, tmp_path):
    model_dir, _, data, _ = setup
    other = tiny_models("qwen2", vocab_size=1024)
    with pytest.raises(ConfigError, match="tokenizer differs from the student's.*same vocabulary"):
        _gkd(model_dir, other, data, tmp_path / "out", "--max_steps", "1")
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")


@pytest.mark.parametrize("flags,message", [
    (["--beta", "1.5"], "--beta 1.5"),
    (["--lmbda", "2"], "--lmbda 2"),
    (["--temperature", "0"], "--temperature 0"),
    (["--gkd_logits_topk", "0"], "--gkd_logits_topk 0"),
    (["--teacher_model", None, "--packing", "true", "--max_length", "64"], "GKD rebuilds each batch"),
    (["--teacher_model", None, "--use_vllm", "true"], "--use_vllm with --rlhf_type gkd"),
    (["--teacher_adapters", "x"], "--teacher_adapters needs --teacher_model"),
    ([], "without --teacher_model is ms-swift's self-distillation"),
])
def test_what_gkd_cannot_do_is_a_flag_error(tiny_models, tmp_path, flags, message):
    from tunesmith.train.recipe import configure

    model = tiny_models("qwen2")
    flags = [model if f is None else f for f in flags]
    args = parse_args("rlhf", ["--rlhf_type", "gkd", "--model", model, "--dataset", "x.jsonl", *flags,
                               "--output_dir", str(tmp_path / "out")])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        configure(args)


def test_gkd_flags_parse_and_unknown_or_unsupported_ones_say_so():
    args = parse_args("rlhf", ["--rlhf_type", "gkd", "--teacher_model", "t", "--lmbda", "1", "--seq_kd", "false",
                               "--sft_alpha", "0.1", "--teacher_model_type", "qwen2", "--gkd_logits_topk", "64"])
    assert (args.rlhf_type, args.teacher_model, args.lmbda, args.seq_kd, args.gkd_logits_topk) == \
        ("gkd", "t", 1.0, False, 64)
    defaults = parse_args("rlhf", ["--rlhf_type", "gkd"])
    assert (defaults.lmbda, defaults.beta, defaults.temperature, defaults.max_completion_length) == \
        (0.5, None, 0.9, 512)  # beta None resolves to GKD's 0.5
    with pytest.raises(ArgError, match="Did you mean --teacher_model"):
        parse_args("rlhf", ["--rlhf_type", "gkd", "--teacher_modle", "t"])
    with pytest.raises(ArgError, match="seq_kd.*deprecated in ms-swift"):
        parse_args("rlhf", ["--rlhf_type", "gkd", "--seq_kd", "true"])
    # the teacher's own DeepSpeed config is a real flag (tests/train/methods/test_gkd_deepspeed.py)
    assert parse_args("rlhf", ["--teacher_deepspeed", "zero3"]).teacher_deepspeed == "zero3"
    # a teacher server is a real flag (tests/train/methods/test_gkd_server.py)
    assert parse_args("rlhf", ["--teacher_model_server", "http://h:1"]).teacher_model_server == "http://h:1"


def test_a_grpo_teacher_is_opd_rl_and_other_methods_note_gkd_flags(tiny_models, tmp_path, capsys):
    from tunesmith.train.recipe import configure

    model = tiny_models("qwen2")
    common = ["--model", model, "--dataset", "x.jsonl", "--output_dir", str(tmp_path / "out")]
    # GRPO takes the teacher (OPD-RL, tests/train/rl/test_grpo_options.py); its incompatibilities are refused
    assert configure(parse_args("rlhf", ["--rlhf_type", "grpo", "--reward_funcs", "format", "--teacher_model", model,
                                         *common]))[1].teacher_model == model
    with pytest.raises(ConfigError, match="OPD-RL"):
        configure(parse_args("rlhf", ["--rlhf_type", "grpo", "--reward_funcs", "format", "--teacher_model", model,
                                      "--loss_type", "real", *common]))
    configure(parse_args("rlhf", ["--rlhf_type", "dpo", "--lmbda", "1", *common]))
    assert "--lmbda: GKD's flags (--rlhf_type gkd) change nothing for --rlhf_type dpo" in capsys.readouterr().err


def test_data_validate_reads_gkd_rows_as_sft_rows(tmp_path, capsys):
    from tunesmith.cli import main

    data = write_jsonl(tmp_path / "rows.jsonl", _rows(3, 0))
    assert main(["data", "validate", "--dataset", data, "--rlhf_type", "gkd"]) == 0
