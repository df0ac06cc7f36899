"""ms-swift's training knobs (issue #32 item 3) on tiny in-process models, each shown to act: LoRA+, GaLore, LISA,
Muon, NEFTune, partial full fine-tuning, length-grouped batches, torch.compile, dataset interleaving, the DFT loss
and per-channel losses; and, where they keep state (GaLore's projections, LISA's layers, Muon's momentum), a resumed
run that equals the uninterrupted one."""
import json
import os

import pytest
import torch

from conftest import losses_by_step, read_jsonl, train, write_jsonl
from tunesmith.config.parser import parse_args
from tunesmith.errors import ConfigError

WORDS = "red blue green black white gold pink gray".split()
QUIET = ["--report_to", "none", "--gradient_checkpointing", "false", "--logging_steps", "1"]
# one deterministic step: plain SGD-like comparisons need no decay, clipping or schedule
EXACT = ["--weight_decay", "0", "--max_grad_norm", "0", "--lr_scheduler_type", "constant"]


def rows(n=16):
    return [{"messages": [{"role": "user", "content": "say " + " ".join(WORDS[: 1 + i % 7])},
                          {"role": "assistant", "content": " ".join(WORDS[: 1 + (3 * i) % 8])}]} for i in range(n)]


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", rows())


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def base_weights(model_dir) -> dict:
    from transformers import AutoModelForCausalLM

    return weights(AutoModelForCausalLM.from_pretrained(model_dir))


def one_step(model_dir, data, out, *flags, train_type="full", command="sft"):
    return train(command, "--model", model_dir, "--dataset", data, "--train_type", train_type, "--max_steps", "1",
                 "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1", "--learning_rate",
                 "1e-2", "--save_strategy", "no", "--output_dir", out, *EXACT, *QUIET, *flags)


def assert_resume_is_exact(model_dir, data, tmp_path, *flags, steps=4, save=2):
    """An uninterrupted run and one resumed from its checkpoint-<save> log the same loss at every step and end
    with the same weights."""
    common = ["--model", model_dir, "--dataset", data, "--train_type", "full", "--max_steps", str(steps),
              "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--save_steps", str(save),
              "--learning_rate", "1e-2", *QUIET, *flags]
    whole = train("sft", *common, "--output_dir", tmp_path / "whole")
    ckpt = os.path.join(whole["run_dir"], f"checkpoint-{save}")
    resumed = train("sft", *common, "--output_dir", tmp_path / "resumed", "--resume_from_checkpoint", ckpt)
    a, b = losses_by_step(whole["run_dir"]), losses_by_step(resumed["run_dir"])
    assert sorted(b) == list(range(1, steps + 1))
    for step in range(save + 1, steps + 1):
        assert a[step] == pytest.approx(b[step], abs=1e-6), (step, a, b)
    wa, wb = weights(whole["model"]), weights(resumed["model"])
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6
    return whole, resumed


# ------------------------------------------------------------------ the flags, checked before anything loads

@pytest.mark.parametrize("flags,match", [
    (["--lorap_lr_ratio", "16", "--train_type", "full"], "LoRA\\+.*--train_type lora"),
    (["--use_galore", "true"], "GaLore.*--train_type full"),
    (["--optimizer", "muon", "--lorap_lr_ratio", "16"], "one optimiser plugin at a time"),
    (["--optim_args", "momentum=0.9"], "--optimizer muon"),
    (["--optimizer", "muon", "--optim_args", "betas=1"], "not one of Muon's settings"),
    (["--lisa_activated_layers", "1"], "LISA.*--train_type full"),
    (["--freeze_parameters", "model.embed_tokens"], "--train_type full"),
    (["--train_type", "full", "--freeze_parameters_regex", "("], "not a valid regular expression"),
    (["--dataset", "a.jsonl", "b.jsonl", "--interleave_prob", "0.5"], "one per dataset"),
    (["--group_by_length", "true", "--dataset_shuffle", "false"], "group_by_length"),
])
def test_knob_flags_are_checked_with_the_others(tiny_models, tmp_path, flags, match):
    from tunesmith.train import recipe

    args = parse_args("sft", ["--model", tiny_models("qwen2"), "--dataset", "a.jsonl", "--output_dir",
                              str(tmp_path), *flags])
    with pytest.raises(ConfigError, match=match):
        recipe.configure(args)


def test_knobs_that_cannot_run_here_say_why():
    from tunesmith.config.parser import ArgError

    with pytest.raises(ArgError, match="galore_optim_per_parameter.*same update"):
        parse_args("sft", ["--galore_optim_per_parameter", "true"])
    with pytest.raises(ArgError, match="Q-GaLore"):
        parse_args("sft", ["--galore_quantization", "true"])
    with pytest.raises(ArgError, match="MuonClip"):
        parse_args("sft", ["--optimizer", "muonclip"])
    with pytest.raises(ConfigError, match="sft and pt"):
        from tunesmith.train import recipe
        recipe.configure(parse_args("rlhf", ["--model", "m", "--dataset", "a", "--enable_dft_loss", "true"]))


# ------------------------------------------------------------------ 2. LoRA+

@pytest.mark.slow
def test_lora_plus_gives_the_b_matrices_ratio_times_the_rate(tiny_models, data, tmp_path):
    """Two learning rates in the optimiser (A at lr, B at lr x 16), and B's first update is 16 times the plain
    LoRA run's: Adam's first step moves every element by lr·g/|g|, so ΔB = 16·ΔB_plain exactly (B starts at 0,
    so A's first gradient is 0 in both runs)."""
    from tunesmith.train.optim import build_optimizer

    model_dir = tiny_models("qwen2")
    plus = one_step(model_dir, data, tmp_path / "plus", "--lorap_lr_ratio", "16", train_type="lora")
    plain = one_step(model_dir, data, tmp_path / "plain", train_type="lora")
    opt = build_optimizer(plus["model"], _optim_slice("--lorap_lr_ratio", "16", "--learning_rate", "1e-2"))
    assert sorted({g["lr"] for g in opt.param_groups if g["params"]}) == [1e-2, pytest.approx(0.16)]
    b_ids = {id(p) for n, p in plus["model"].named_parameters() if "lora_B" in n}
    assert all(id(p) in b_ids for g in opt.param_groups if g["lr"] == pytest.approx(0.16) for p in g["params"])
    wp, wn = weights(plus["model"]), weights(plain["model"])
    b_keys = [k for k in wp if "lora_B" in k]
    assert b_keys and all(float(wn[k].abs().max()) > 0 for k in b_keys)
    for k in b_keys:
        assert torch.allclose(wp[k], 16 * wn[k], rtol=1e-3, atol=1e-7), k
    for k in (k for k in wp if "lora_A" in k):
        assert torch.equal(wp[k], wn[k])


def _optim_slice(*flags):
    from tunesmith.config.slices import OptimConfig, take

    return take(OptimConfig, parse_args("sft", list(flags)))


# ------------------------------------------------------------------ 3. GaLore

@pytest.mark.slow
def test_galore_update_lies_in_the_rank_r_projection(tiny_models, data, tmp_path):
    """--use_galore --galore_rank 2 on the q_proj weights: their first update has rank 2 (it is P·Adam(PᵀG), P the
    top-2 singular vectors of the gradient), while an untargeted weight's AdamW update has full rank."""
    pytest.importorskip("galore_torch")
    model_dir = tiny_models("qwen2")
    before = base_weights(model_dir)
    res = one_step(model_dir, data, tmp_path / "o", "--use_galore", "true", "--galore_rank", "2",
                   "--galore_target_modules", "q_proj")
    after = weights(res["model"])
    for k in (k for k in after if k.endswith("q_proj.weight")):
        s = torch.linalg.svdvals((after[k] - before[k]).double())
        assert float(s[1]) > 1e-3 * float(s[0]) and float(s[2]) < 1e-6 * float(s[0]), (k, s[:4])
    s = torch.linalg.svdvals((after["model.layers.0.self_attn.k_proj.weight"]
                              - before["model.layers.0.self_attn.k_proj.weight"]).double())
    assert float(s[8]) > 1e-2 * float(s[0])


@pytest.mark.slow
def test_galore_resume_keeps_the_projection(tiny_models, data, tmp_path):
    """The projection (recomputed every 3 steps) lives in the optimiser state: resumed at step 2, steps 3-4 use
    the step-1 projection, as the uninterrupted run does."""
    pytest.importorskip("galore_torch")
    assert_resume_is_exact(tiny_models("qwen2"), data, tmp_path, "--use_galore", "true", "--galore_rank", "4",
                           "--galore_update_proj_gap", "3")


# ------------------------------------------------------------------ 4. LISA

@pytest.mark.slow
def test_lisa_trains_the_drawn_layers_and_resume_redraws_them(tiny_models, data, tmp_path):
    """--lisa_activated_layers 1 --lisa_step_interval 2 on a 4-layer model: after 2 steps exactly the layer drawn
    for steps 1-2 changed (and the embeddings, which always train); after 4, the union of the two draws; a run
    resumed at step 2 draws the same layers and ends equal."""
    from tunesmith.train.knobs.lisa import LISA

    model_dir = tiny_models("qwen2", layers=4)
    seed = next(s for s in range(100) if LISA(range(4), 1, 2, s).draw(0) != LISA(range(4), 1, 2, s).draw(2))
    draws = [LISA(range(4), 1, 2, seed).draw(step) for step in (0, 2)]
    flags = ["--lisa_activated_layers", "1", "--lisa_step_interval", "2", "--seed", str(seed)]
    before = base_weights(model_dir)

    def changed_layers(model):
        after = weights(model)
        return sorted({int(k.split(".")[2]) for k in after if k.startswith("model.layers.")
                       and not torch.equal(after[k], before[k])}), not torch.equal(
            after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])

    two = train("sft", "--model", model_dir, "--dataset", data, "--train_type", "full", "--max_steps", "2",
                "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-2",
                "--save_strategy", "no", "--output_dir", tmp_path / "two", *QUIET, *flags)
    assert changed_layers(two["model"]) == (draws[0], True)
    whole, _ = assert_resume_is_exact(model_dir, data, tmp_path, *flags)
    assert changed_layers(whole["model"]) == (sorted(set(draws[0] + draws[1])), True)
    saved = json.load(open(os.path.join(whole["run_dir"], "checkpoint-2", "lisa.json"), encoding="utf-8"))
    assert saved["active_layers"] == draws[1]  # at step 2 the next block's layer is already on


# ------------------------------------------------------------------ 5. Muon

@pytest.mark.slow
def test_muon_update_is_orthogonalised(tiny_models, data, tmp_path):
    """--optimizer muon: a hidden matrix's first update is Newton-Schulz-orthogonalised momentum — its leading
    singular values nearly equal (within 1.6x over the top 16; AdamW's spread over 3x), at Moonlight's scale
    lr·0.2·sqrt(max(A, B)) — while the embeddings take AdamW (a first AdamW step moves each element by about lr)."""
    model_dir = tiny_models("qwen2")
    before = base_weights(model_dir)
    muon = weights(one_step(model_dir, data, tmp_path / "muon", "--optimizer", "muon")["model"])
    adamw = weights(one_step(model_dir, data, tmp_path / "adamw")["model"])
    key = "model.layers.0.self_attn.q_proj.weight"
    s_muon = torch.linalg.svdvals((muon[key] - before[key]).double())
    s_adamw = torch.linalg.svdvals((adamw[key] - before[key]).double())
    assert float(s_muon[0] / s_muon[15]) < 1.6 and float(s_adamw[0] / s_adamw[15]) > 3
    scale = 1e-2 * 0.2 * 64 ** 0.5
    assert 0.6 * scale < float(s_muon[0]) < 1.3 * scale
    emb = "model.embed_tokens.weight"
    moved = (muon[emb] - before[emb]).abs()
    assert float(moved.max()) == pytest.approx(1e-2, rel=1e-3)  # AdamW's first step: lr per element


@pytest.mark.slow
def test_muon_resume_keeps_the_momentum(tiny_models, data, tmp_path):
    assert_resume_is_exact(tiny_models("qwen2"), data, tmp_path, "--optimizer", "muon", "--optim_args",
                           "momentum=0.9,ns_steps=5,nesterov=true")


def test_muon_settings_from_optim_args():
    from tunesmith.train.knobs.muon import muon_args

    assert muon_args("momentum=0.9, ns_steps=6,nesterov=false") == {"momentum": 0.9, "ns_steps": 6,
                                                                    "nesterov": False}


# ------------------------------------------------------------------ 6. NEFTune

@pytest.mark.slow
def test_neftune_noise_in_training_only(tiny_models, tmp_path):
    """--neftune_noise_alpha 5 reaches the model: in training mode the input embeddings carry uniform noise of
    scale alpha/sqrt(L·d) (every element within it, the largest near it); in eval mode (validation, inference)
    they are exactly the plain embeddings."""
    from tunesmith.models.load import default_device  # noqa: F401 - the model loads as training loads it
    from tunesmith.train import recipe
    from tunesmith.train.setup import prepare_data, prepare_model

    model_dir = tiny_models("qwen2")
    data = write_jsonl(tmp_path / "d.jsonl", rows(4))
    args = parse_args("sft", ["--model", model_dir, "--dataset", data, "--neftune_noise_alpha", "5",
                              "--output_dir", str(tmp_path / "o")])
    cfg, method = recipe.configure(args)
    prepared = prepare_data(cfg.data, cfg.model, method)
    model, _ = prepare_model(cfg.model, prepared.model_dir, prepared.tokenizer, cfg.optim.seed)
    emb = model.get_input_embeddings()
    ids = torch.arange(3, 23)[None]  # L = 20
    plain = torch.nn.functional.embedding(ids, emb.weight)
    model.train()
    noise = emb(ids) - plain
    bound = 5 / (20 * emb.weight.shape[1]) ** 0.5
    assert float(noise.abs().max()) <= bound * (1 + 1e-6) and float(noise.abs().max()) > 0.9 * bound
    model.eval()
    assert torch.equal(emb(ids), plain)


@pytest.mark.slow
def test_neftune_and_group_by_length_resume_exactly(tiny_models, data, tmp_path):
    """NEFTune's noise comes from the RNG a checkpoint restores, and the length-grouped order from --seed and the
    epoch: a resumed run draws the same noise and the same batches."""
    assert_resume_is_exact(tiny_models("qwen2"), data, tmp_path, "--neftune_noise_alpha", "5", "--group_by_length",
                           "true", steps=6)


# ------------------------------------------------------------------ 7. partial full fine-tuning

def test_freeze_ratio_counts_elements_from_the_bottom():
    from tunesmith.train.knobs.freeze import frozen_by_ratio

    assert frozen_by_ratio([10, 20, 30, 40], 0.3) == 2   # 30 elements: the first two parameters
    assert frozen_by_ratio([10, 20, 30, 40], 0.29) == 1
    assert frozen_by_ratio([10, 20, 30, 40], 0.0) == 0 and frozen_by_ratio([10, 20, 30, 40], 1.0) == 4


@pytest.mark.slow
def test_freezing_trains_exactly_the_chosen_parameters(tiny_models, data, tmp_path):
    """--freeze_parameters_ratio 0.7 (the first parameters up to 70% of the elements: the embeddings, 64% of the
    tiny model, and 7 of layer 0), --freeze_parameters model.norm model.layers.0., then --trainable_parameters_regex
    'layers\\.0\\..*q_proj' (layer 0's q_proj trains again): after a step exactly the parameters the rule leaves
    trainable have changed (ms-swift's order)."""
    from tunesmith.train.knobs.freeze import frozen_by_ratio

    model_dir = tiny_models("qwen2")
    before = base_weights(model_dir)
    res = one_step(model_dir, data, tmp_path / "o", "--freeze_parameters_ratio", "0.7", "--freeze_parameters",
                   "model.norm", "model.layers.0.", "--trainable_parameters_regex", r"layers\.0\..*q_proj")
    named = list(res["model"].named_parameters())
    n = frozen_by_ratio([p.numel() for _, p in named], 0.7)
    expect = {name for i, (name, _) in enumerate(named)
              if i >= n and not name.startswith(("model.norm", "model.layers.0."))} | \
        {name for name, _ in named if "layers.0." in name and "q_proj" in name}
    trainable = {name for name, p in named if p.requires_grad}
    after = weights(res["model"])
    changed = {name for name, _ in named if not torch.equal(after[name], before[name])}
    assert trainable == expect == changed and n == 8 and "model.embed_tokens.weight" not in changed
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.layers.0.self_attn.k_proj.weight" not in changed


# ------------------------------------------------------------------ 8. group_by_length, torch.compile, interleaving

def test_group_by_length_pads_less_and_covers_every_row_once():
    """Length-grouped epochs (transformers' get_length_grouped_indices, seeded): each epoch is a permutation of
    the rows, the same for the same seed, and its batches waste far less padding than the shuffled order's."""
    import random

    from tunesmith.train.microbatches import epoch_batches

    lengths = [random.Random(i).randint(5, 500) for i in range(1000)]

    def waste(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped = epoch_batches(1000, 8, 7, True, lengths)
    shuffled = epoch_batches(1000, 8, 7, True)
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    assert grouped == epoch_batches(1000, 8, 7, True, lengths) != epoch_batches(1000, 8, 8, True, lengths)
    assert waste(grouped) < 0.2 * waste(shuffled)


@pytest.mark.slow
def test_group_by_length_run_trains_every_row_each_epoch(tiny_models, tmp_path, monkeypatch):
    import tunesmith.train.microbatches as mb

    seen, original = [], mb.epoch_batches

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append((args[4] if len(args) > 4 else kwargs.get("lengths"), out))
        return out

    monkeypatch.setattr(mb, "epoch_batches", spy)
    data = write_jsonl(tmp_path / "d.jsonl", rows(12))
    train("sft", "--model", tiny_models("qwen2"), "--dataset", data, "--num_train_epochs", "2", "--group_by_length",
          "true", "--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "1", "--save_strategy", "no",
          "--output_dir", tmp_path / "o", *QUIET)
    epochs = [out for lengths, out in seen if lengths is not None]
    assert len(epochs) == 2 and all(sorted(i for b in e for i in b) == list(range(12)) for e in epochs)


@pytest.mark.slow
def test_torch_compile_first_loss_equals_eager(tiny_models, data, tmp_path):
    """--torch_compile (inductor on the CPU): the decoder layers are compiled and the first step's loss equals the
    uncompiled run's within 1e-5. Skipped, saying so, where torch.compile cannot build kernels here."""
    model_dir = tiny_models("qwen2")
    eager = one_step(model_dir, data, tmp_path / "eager")
    try:
        compiled = one_step(model_dir, data, tmp_path / "compiled", "--torch_compile", "true")
    except Exception as e:  # noqa: BLE001 - inductor without a C++ compiler, an unsupported platform
        pytest.skip(f"torch.compile does not run on this machine: {type(e).__name__}: {e}")
    layers = compiled["model"].model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    a, b = losses_by_step(eager["run_dir"])[1], losses_by_step(compiled["run_dir"])[1]
    assert abs(a - b) < 1e-5


@pytest.mark.slow
def test_interleave_mixes_datasets_as_datasets_does(tiny_models, tmp_path):
    """--interleave_prob 0.6 0.3 0.1 over three datasets: the training rows are exactly the ones Hugging Face
    datasets' interleave_datasets picks (seed --data_seed, first_exhausted) from the rows themselves, so their
    proportions follow the probabilities; all_exhausted goes on until every dataset was used up."""
    from datasets import Dataset, interleave_datasets

    from tunesmith.train import recipe
    from tunesmith.train.setup import prepare_data

    texts = [[f"{name} {i}" for i in range(n)] for name, n in (("alpha", 120), ("beta", 60), ("gamma", 30))]
    files = [write_jsonl(tmp_path / f"{k}.jsonl", [{"text": t} for t in ts]) for k, ts in enumerate(texts)]
    for strategy in ("first_exhausted", "all_exhausted"):
        args = parse_args("pt", ["--model", tiny_models("qwen2"), "--dataset", *files, "--interleave_prob", "0.6",
                                 "0.3", "0.1", "--stopping_strategy", strategy, "--data_seed", "3",
                                 "--output_dir", str(tmp_path / "o")])
        cfg, method = recipe.configure(args)
        prepared = prepare_data(cfg.data, cfg.model, method)
        got = [prepared.tokenizer.decode(r.input_ids[:-1]) for r in prepared.train_rows]
        want = interleave_datasets([Dataset.from_dict({"t": ts}) for ts in texts], probabilities=[0.6, 0.3, 0.1],
                                   seed=3, stopping_strategy=strategy)["t"]
        assert got == want
        share = [sum(t.startswith(name) for t in got) / len(got) for name in ("alpha", "beta", "gamma")]
        assert share == pytest.approx([0.6, 0.3, 0.1], abs=0.06)
        if strategy == "first_exhausted":  # it ends with the last row of the dataset that ran out first
            assert any(got[-1] == ts[-1] for ts in texts) and len(set(got)) == len(got)
        else:  # every dataset's last row was reached; the smaller ones start over
            assert all(ts[-1] in got for ts in texts) and len(set(got)) < len(got)


# ------------------------------------------------------------------ 8. the DFT loss and per-channel losses

@pytest.mark.parametrize("head_trained", [False, True])
def test_dft_loss_equals_an_independent_computation(tiny_models, head_trained):
    """token_loss(dft=True) = −Σ sg(p)·log p over the trained tokens (Wu et al. 2025, eq. 9), computed here from
    the model's own logits; its gradient too (through the chunked head, including a trained output layer)."""
    from transformers import AutoModelForCausalLM

    from tunesmith.data.collate import pad_collate
    from tunesmith.data.encode import Encoded
    from tunesmith.train.methods.sft import token_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_models("qwen2"))
    model.get_output_embeddings().weight.requires_grad_(head_trained)  # frozen: LoRA's case
    ids = [torch.randint(3, 500, (n,)).tolist() for n in (9, 6)]
    batch = pad_collate([Encoded(x, [-100, -100] + x[2:]) for x in ids], pad_id=0)
    parts, stats = token_loss(model, batch, dft=True)
    parts["tokens"].backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0][keep]
    reference = -(logp.detach().exp() * logp).sum()
    reference.backward()
    assert stats["n_tokens"] == int(keep.sum()) == 11
    assert float(parts["tokens"].detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    assert set(ours) == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(ours[n], p.grad, atol=1e-6, rtol=1e-4), n


@pytest.mark.slow
def test_dft_run_differs_from_cross_entropy(tiny_models, data, tmp_path):
    a = losses_by_step(one_step(tiny_models("qwen2"), data, tmp_path / "ce")["run_dir"])[1]
    b = losses_by_step(one_step(tiny_models("qwen2"), data, tmp_path / "dft", "--enable_dft_loss", "true")["run_dir"])[1]
    # DFT's per-token loss is p·(−log p) < −log p; on a random model p ≈ 1/V, so it is ~V times smaller
    assert 0 < b < a / 100


@pytest.mark.slow
def test_channel_loss_is_logged_per_channel(tiny_models, tmp_path):
    """--enable_channel_loss: rows with `channel` a or b (and one without) log loss_a, loss_b and loss_None at step 1
    and in validation; each equals that channel's mean token cross-entropy computed from the model's own logits
    (step 1's loss is computed before any update), and their token-weighted mean is the logged loss."""
    from transformers import AutoModelForCausalLM

    from tunesmith.train import recipe
    from tunesmith.train.setup import prepare_data

    model_dir = tiny_models("qwen2")
    recs = [dict(r, channel=("a" if i % 3 == 0 else "b")) if i % 5 else r for i, r in enumerate(rows(10))]
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    argv = ["--model", model_dir, "--dataset", data, "--val_dataset", data, "--enable_channel_loss", "true",
            "--train_type", "full", "--max_steps", "1", "--per_device_train_batch_size", "10",
            "--gradient_accumulation_steps", "1", "--save_strategy", "no", "--eval_strategy", "steps",
            "--eval_steps", "1", "--output_dir", str(tmp_path / "o"), *QUIET]
    res = train("sft", *argv)
    log = read_jsonl(os.path.join(res["run_dir"], "logging.jsonl"))
    step, evals = next(r for r in log if "grad_norm" in r), next(r for r in log if "eval_loss" in r)
    cfg, method = recipe.configure(parse_args("sft", argv))
    prepared = prepare_data(cfg.data, cfg.model, method)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    sums, counts = {}, {}
    with torch.no_grad():
        for enc in prepared.train_rows:
            logits = model(input_ids=torch.tensor([enc.input_ids])).logits[0, :-1].float()
            labels = torch.tensor(enc.labels[1:])
            keep = labels != -100
            nll = -torch.log_softmax(logits, -1)[keep].gather(-1, labels[keep][:, None]).sum()
            c = str(enc.channel)
            sums[c], counts[c] = sums.get(c, 0.0) + float(nll), counts.get(c, 0) + int(keep.sum())
    assert set(sums) == {"a", "b", "None"}
    for c in sums:
        assert step[f"loss_{c}"] == pytest.approx(sums[c] / counts[c], abs=2e-5), c
        assert f"eval_loss_{c}" in evals
    assert step["loss"] == pytest.approx(sum(sums.values()) / sum(counts.values()), abs=2e-5)


def test_channels_follow_rows_through_padding_and_packing():
    """Each sequence's `channel` rides in the batch (`channels`, by row or packed sequence id) and channel_stats
    sums each channel's per-token loss and tokens over the sequences that token_logps says they belong to."""
    from tunesmith.data.collate import PackedCollate, pad_collate
    from tunesmith.data.encode import Encoded
    from tunesmith.train.methods.sft import channel_stats

    def enc(n, channel):
        e = Encoded(list(range(3, 3 + n)), list(range(3, 3 + n)))
        e.channel = channel
        return e

    assert "channels" not in pad_collate([enc(3, None), enc(2, None)], pad_id=0)
    assert pad_collate([enc(3, "a"), enc(2, None)], pad_id=0)["channels"] == ["a", None]
    packed = PackedCollate(0)([[enc(3, "a"), enc(2, "b")], [enc(4, "a")]])
    assert packed["channels"] == ["a", "b", "a"] and packed["n_seq"] == 3
    per_token = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    rows = torch.tensor([0, 0, 1, 2, 2, 2])
    assert channel_stats(per_token, rows, packed["channels"]) == {
        "channel_loss/a": 18.0, "channel_tokens/a": 5, "channel_loss/b": 3.0, "channel_tokens/b": 1}
    assert channel_stats(per_token, rows, None) == {"channel_loss/None": 21.0, "channel_tokens/None": 6}
