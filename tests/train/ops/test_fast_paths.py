"""Every speed/memory path is exact against the plain computation (fp32): chunked log-probs, padding-free packing."""
import os

import pytest
import torch

from conftest import EXAMPLES, step_losses, train
from tunesmith.data.collate import pad_collate
from tunesmith.data.encode import ChatEncoder
from tunesmith.data.load import load_datasets


def _rows(model_dir, n=12):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = ChatEncoder(tok)
    recs = load_datasets([os.path.join(EXAMPLES, "capitals_messages.jsonl"),
                          os.path.join(EXAMPLES, "capitals_alpaca.json")]).records[:n]
    return tok, [enc.encode(r) for r in recs]


def _lora(model_dir, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_pretrained(model_dir)
    m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return m


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("train_lm_head", [False, True])
def test_chunked_logps_equal_plain_with_gradients(tiny_models, train_lm_head):
    from tunesmith.models.head import chunked_head
    from tunesmith.train.ops.token_logps import token_logps

    model_dir = tiny_models("qwen2")
    tok, rows = _rows(model_dir)
    batch = pad_collate(rows, tok.pad_token_id)
    model = _lora(model_dir)
    if train_lm_head:
        model.get_base_model().lm_head.weight.requires_grad_(True)
    assert chunked_head(model) is not None
    results = {}
    for chunked in (False, True):
        model.zero_grad(set_to_none=True)
        out = token_logps(model, batch, chunked=chunked, chunk=7)  # 7 tokens per chunk: many chunks
        # an uneven upstream gradient per token (as DPO's per-sequence weights produce)
        weights = torch.linspace(0.5, 2.0, out.logps.numel())
        (-(out.logps * weights).sum()).backward()
        results[chunked] = (out, _grads(model))
    (plain, gp), (fast, gf) = results[False], results[True]
    assert torch.allclose(plain.logps, fast.logps, atol=1e-5)
    assert torch.equal(plain.rows, fast.rows) and torch.equal(plain.correct, fast.correct)
    assert torch.allclose(plain.logits_mean, fast.logits_mean, atol=1e-5)
    assert gp.keys() == gf.keys() and len(gp) > 0
    # the tiny model ties lm_head to embed_tokens: the head's gradient shows under either name
    assert any("lm_head" in k or "embed_tokens" in k for k in gp) == train_lm_head
    for k in gp:
        assert torch.allclose(gp[k], gf[k], atol=1e-5, rtol=1e-4), k


def test_models_the_chunked_path_cannot_serve_use_the_plain_path(tiny_models):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from tunesmith.models.head import chunked_head

    m = AutoModelForCausalLM.from_pretrained(tiny_models("qwen2"))
    saved = get_peft_model(m, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert chunked_head(saved) is None  # lm_head is wrapped: the model's own forward is the only exact path
    moe = AutoModelForCausalLM.from_pretrained(tiny_models("gpt_oss"), output_router_logits=True)
    assert chunked_head(moe) is None    # the router loss comes from the model's forward


def _model(model_dir, attn):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn)


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_batch_equals_per_example_computation(tiny_models, attn):
    """One concatenated sequence, position_ids restarting per row: loss and gradients equal each row run alone."""
    from tunesmith.data.collate import PackedCollate, flat_collate
    from tunesmith.train.methods.sft import token_loss

    model_dir = tiny_models("qwen2")
    tok, rows = _rows(model_dir, 8)
    model = _model(model_dir, attn)
    model.zero_grad(set_to_none=True)
    total, n = 0.0, 0
    for r in rows:  # the reference: every row on its own, no padding at all
        parts, stats = token_loss(model, pad_collate([r], tok.pad_token_id))
        parts["tokens"].backward()
        total += float(parts["tokens"])
        n += stats["n_tokens"]
    alone = _grads(model)
    flat = flat_collate(rows)
    packed = PackedCollate(tok.pad_token_id)([rows[:3], rows[3:]])  # two packed rows, the shorter padded at the end
    assert flat["input_ids"].shape[0] == 1 and packed["input_ids"].shape[0] == 2
    for batch in (flat, packed):
        model.zero_grad(set_to_none=True)
        assert "attention_mask" not in batch and batch["n_tokens"] == n
        parts, stats = token_loss(model, batch)
        parts["tokens"].backward()
        assert float(parts["tokens"]) == pytest.approx(total, rel=1e-6, abs=1e-5)
        for k, g in _grads(model).items():
            assert torch.allclose(g, alone[k], atol=1e-5, rtol=1e-4), k


def test_padding_free_pairs_give_the_same_sequence_logps(tiny_models):
    from tunesmith.train.methods import pairs as preference

    model_dir = tiny_models("qwen2")
    tok, rows = _rows(model_dir, 8)
    pairs = [preference.Pair(rows[i], rows[i + 1]) for i in range(0, 8, 2)]
    model = _model(model_dir, "sdpa")
    padded = preference.sequence_logps(model, preference.pair_collate(pairs, tok.pad_token_id))
    flat_batch = preference.pair_collate(pairs, tok.pad_token_id, flat=True)
    flat = preference.sequence_logps(model, flat_batch)
    assert torch.allclose(padded.logps, flat.logps, atol=1e-5) and torch.equal(padded.n, flat.n)
    packed = preference.sequence_logps(model, preference.PackedPairCollate(tok.pad_token_id)([pairs[:1], pairs[1:]]))
    assert torch.allclose(padded.logps, packed.logps, atol=1e-5) and torch.equal(padded.n, packed.n)
    assert flat_batch["n_tokens"] == preference.pair_collate(pairs, tok.pad_token_id)["n_tokens"]


def test_pack_groups_fill_without_overflow():
    from tunesmith.data.collate import pack_groups
    lengths = [30, 700, 120, 512, 64, 1000, 5, 260, 90, 2000, 333]
    groups = pack_groups(lengths, 1024)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 1024 for g in groups if len(g) > 1)
    assert [9] in groups  # a row over the capacity travels alone
    assert len(groups) == 5 and pack_groups(lengths, 1024) == groups  # tight and deterministic


def _sft_losses(tmp_path, name, model_dir, *extra):
    """4 steps of full fine-tuning on the capitals rows (two formats): the loss of each step."""
    res = train("sft", "--model", model_dir, "--dataset", os.path.join(EXAMPLES, "capitals_messages.jsonl"),
                os.path.join(EXAMPLES, "capitals_alpaca.json"), "--train_type", "full", "--max_steps", "4",
                "--logging_steps", "1", "--learning_rate", "1e-3", "--per_device_train_batch_size", "4",
                "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path / name), "--report_to", "none",
                "--gradient_checkpointing", "false", *extra)
    return step_losses(res["run_dir"])


@pytest.mark.slow
def test_padding_free_and_packing_runs(tiny_models, tmp_path, capsys):
    model_dir = tiny_models("qwen2")
    plain = _sft_losses(tmp_path, "plain", model_dir)
    free = _sft_losses(tmp_path, "free", model_dir, "--padding_free", "true")
    assert free == pytest.approx(plain, abs=1e-5)  # same batches, no padding: the same run
    packed = _sft_losses(tmp_path, "packed", model_dir, "--packing", "true", "--max_length", "128",
                    "--per_device_train_batch_size", "1")
    assert "--packing: 16 rows -> 6 sequences of up to 128 tokens" in capsys.readouterr().err
    assert len(packed) == 4 and packed[-1] < packed[0]


@pytest.mark.slow
def test_dpo_padding_free_and_packing_runs(tiny_models, tmp_path):
    from conftest import read_jsonl
    from tunesmith.config.parser import parse_args
    from tunesmith.train import recipe

    def run(name, *extra):
        res = recipe.main(parse_args("rlhf", [
            "--model", tiny_models("qwen2"), "--dataset", os.path.join(EXAMPLES, "dpo_messages.jsonl"),
            "--max_steps", "3", "--logging_steps", "1", "--learning_rate", "5e-3", "--rpo_alpha", "0.2",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--report_to", "none",
            "--output_dir", str(tmp_path / name), *extra]))
        return [r for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "rewards/margins" in r]

    plain = run("plain", "--prefix_sharing", "false")
    for name, extra in (("shared", ("--prefix_sharing", "true")), ("free", ("--padding_free", "true")),
                        ("free-unshared", ("--padding_free", "true", "--prefix_sharing", "false"))):
        other = run(name, *extra)
        assert len(other) == len(plain) == 3
        for a, b in zip(plain, other):
            for k in ("loss", "rewards/margins", "nll_loss", "logps/chosen", "logps/rejected", "logits/rejected"):
                assert a[k] == pytest.approx(b[k], abs=1e-5), (name, k)
    packed = run("packed", "--packing", "true", "--max_length", "256", "--per_device_train_batch_size", "1")
    assert packed[0]["loss"] == pytest.approx(packed[0]["pref_loss"] + 0.2 * packed[0]["nll_loss"], abs=1e-5)
    assert packed[0]["pref_loss"] == pytest.approx(0.6931472, abs=1e-6)


# ------------------------------------------------------------------ DPO prefix sharing

def _sliding_model(family, attn, window=8):
    """A tiny model whose sliding-window layers matter: the pairs below are several windows long."""
    from transformers import AutoModelForCausalLM
    from tunesmith.testing import build_config

    cfg = build_config(family, 300, layers=2)
    if family == "qwen2":  # one full-attention layer, then sliding ones
        cfg.use_sliding_window, cfg.max_window_layers = True, 1
        cfg.layer_types = ["full_attention", "sliding_attention"]
    if family in ("qwen2", "gpt_oss"):
        cfg.sliding_window = window
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)


def _synthetic_pairs(n=6, seed=0):
    """Pairs with prompts and completions of different lengths, completions that start with the same token, and
    one pair with a trained turn inside the prompt (multi-turn with every turn trained), which must not be shared."""
    import random
    from tunesmith.data.encode import IGNORE, Encoded
    from tunesmith.train.methods.pairs import Pair

    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        prompt = [rng.randrange(3, 300) for _ in range(rng.randrange(4, 30))]
        first = rng.randrange(3, 300)
        c = [first] + [rng.randrange(3, 300) for _ in range(rng.randrange(2, 25))]
        r = [first] + [rng.randrange(3, 300) for _ in range(rng.randrange(2, 25))]
        lab = [IGNORE] * len(prompt)
        if i == 2:
            lab[len(prompt) // 2:len(prompt) // 2 + 3] = prompt[len(prompt) // 2:len(prompt) // 2 + 3]
        pairs.append(Pair(Encoded(prompt + c, lab + c), Encoded(prompt + r, lab + r)))
    return pairs


@pytest.mark.slow
@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"),
                                         ("qwen2", "eager"), ("gpt_oss", "eager")])
def test_prefix_shared_pairs_equal_two_sequences_with_gradients(family, attn):
    """[prompt, chosen, rejected] in one sequence (alone, flat, or packed several pairs to a row) gives the
    two-sequence log-probs and gradients, also with sliding-window layers and MoE."""
    from tunesmith.train.methods import pairs as P
    from tunesmith.train.ops.token_logps import prefix_sharing_support

    model = _sliding_model(family, attn)
    assert prefix_sharing_support(model) is None
    pairs = _synthetic_pairs()
    shared = P.SharedPairCollate(0)(pairs)
    assert shared["input_ids"].shape[1] < P.pair_collate(pairs, 0)["input_ids"].shape[1] * 2
    assert shared["n_tokens"] == P.pair_collate(pairs, 0)["n_tokens"]
    weights = torch.linspace(-1.0, 2.0, 2 * len(pairs))
    results = []
    for batch in (P.pair_collate(pairs, 0), shared, P.SharedPairCollate(0, flat=True)(pairs),
                  P.SharedPairCollate(0, packed=True)([pairs[:2], pairs[2:5], pairs[5:]])):
        model.zero_grad(set_to_none=True)
        out = P.sequence_logps(model, batch, ld_alpha=0.5, n_pairs=len(pairs))
        (out.logps * weights).sum().backward()
        results.append((out, _grads(model)))
    (ref, g_ref) = results[0]
    for out, g in results[1:]:
        assert torch.equal(out.n, ref.n)
        assert torch.allclose(out.logps, ref.logps, atol=1e-5, rtol=1e-6)
        for k, v in g_ref.items():
            assert torch.allclose(g[k], v, atol=1e-5, rtol=1e-4), k


def test_prefix_sharing_is_refused_where_the_mask_cannot_be_passed(tiny_models):
    from tunesmith.config.parser import parse_args
    from tunesmith.errors import ConfigError
    from tunesmith.train.methods import pairs as P

    model = _sliding_model("llama", "sdpa")
    model.config._attn_implementation = "flash_attention_2"
    data = parse_args("rlhf", ["--model", "m", "--dataset", "d.jsonl", "--packing", "true"])
    with pytest.raises(ConfigError, match="flash_attention_2 takes no arbitrary attention mask"):
        P.choose_prefix_sharing(True, data, model, _synthetic_pairs(2), 0)
    # the default: falls back to two sequences and says why
    assert P.choose_prefix_sharing(None, data, model, _synthetic_pairs(2), 0) is False


# ------------------------------------------------------------------ no [tokens x vocabulary] tensor, anywhere

class _Largest:
    """A TorchDispatchMode recording the largest tensor with a vocabulary-sized dimension that any op creates
    (forward and backward) — logits-like tensors; other large buffers (DeepSpeed's gradient buckets) are not
    logits."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        probe = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and probe.vocab in t.shape and t.numel() > probe.numel:
                        probe.numel, probe.op = t.numel(), str(func)
                return out

        self.numel, self.op, self.mode = 0, None, Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def _long_batch(vocab, rows=2, length=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :10] = -100  # a prompt
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _step_largest(model, batch, chunk_rows=8):
    """(largest tensor created by token_logps + backward, the TokenLogps, the gradients), with `chunk_rows`
    tokens per chunk."""
    import tunesmith.train.ops.token_logps as tl
    from tunesmith.models.load import unwrap_model

    vocab = unwrap_model(model).get_output_embeddings().weight.shape[0]
    model.zero_grad(set_to_none=True)
    with _Largest(vocab) as probe:
        out = tl.token_logps(model, batch, chunk=chunk_rows)
        loss = -out.logps.sum() + (0.01 * out.aux_loss if out.aux_loss is not None else 0)
        loss.backward()
    return probe, out, _grads(model)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "gpt_oss"])
def test_no_tokens_x_vocabulary_tensor_in_a_training_step(tiny_models, family):
    """A training step's log-probs and gradients — a dense model, and an MoE model that returns its router loss —
    never create a tensor of [trained tokens x vocabulary] elements (a dispatch-mode probe sees every op, backward
    included), and equal the plain path's (which does create one) to 1e-5."""
    from transformers import AutoModelForCausalLM

    import tunesmith.train.ops.token_logps as tl

    kw = {"output_router_logits": True, "router_aux_loss_coef": 0.01} if family == "gpt_oss" else {}
    model = AutoModelForCausalLM.from_pretrained(tiny_models(family), **kw)
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = _long_batch(vocab)
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    probe, fast, gf = _step_largest(model, batch)
    assert probe.numel < tokens * vocab // 2, (probe.numel, probe.op, tokens * vocab)
    model.zero_grad(set_to_none=True)
    with _Largest(vocab) as plain_probe:
        plain = tl.token_logps(model, batch, chunked=False)
        (-plain.logps.sum() + (0.01 * plain.aux_loss if plain.aux_loss is not None else 0)).backward()
    assert plain_probe.numel >= tokens * vocab  # the probe does see a full logits tensor when there is one
    gp = _grads(model)
    assert torch.allclose(plain.logps, fast.logps, atol=1e-5)
    if family == "gpt_oss":
        assert fast.aux_loss is not None and torch.allclose(plain.aux_loss, fast.aux_loss, atol=1e-6)
    for k in gp:
        assert torch.allclose(gp[k], gf[k], atol=1e-5, rtol=1e-4), k


def _ddp_worker(rank, model_dir, port, result):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(AutoModelForCausalLM.from_pretrained(model_dir))
    vocab = model.module.get_output_embeddings().weight.shape[0]
    batch = _long_batch(vocab, seed=rank)
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    probe, out, grads = _step_largest(model, batch)
    result[rank] = (probe.numel, tokens * vocab, out.logps.detach(), {k: v for k, v in grads.items()})
    dist.destroy_process_group()


@pytest.mark.slow
def test_no_tokens_x_vocabulary_tensor_under_ddp(tiny_models):
    """Under DDP the log-probs go through the wrapper's own forward (its hooks and gradient all-reduce hold) and
    still never create a [tokens x vocabulary] tensor; the all-reduced gradients equal the average of the two
    processes' plain-path gradients (1e-5)."""
    import socket

    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    import tunesmith.train.ops.token_logps as tl

    model_dir = tiny_models("qwen2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(model_dir, port, result), nprocs=2, join=True)
    grads = []
    for rank in range(2):
        largest, full, logps, _ = result[rank]
        assert largest < full // 2, (rank, largest, full)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        batch = _long_batch(model.get_output_embeddings().weight.shape[0], seed=rank)
        plain = tl.token_logps(model, batch, chunked=False)
        (-plain.logps.sum()).backward()
        assert torch.allclose(plain.logps, logps, atol=1e-5)
        grads.append(_grads(model))
    ddp = result[0][3]
    for k, g in ddp.items():
        name = k.removeprefix("module.")
        assert torch.allclose(g, (grads[0][name] + grads[1][name]) / 2, atol=1e-5, rtol=1e-4), k


def _zero_worker(rank, model_dir, port, stage, result):
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    import tunesmith.train.ops.token_logps as tl

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": stage},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
    keep = HfDeepSpeedConfig(cfg)  # noqa: F841 - ZeRO-3 partitions the weights as from_pretrained loads them
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    engine, *_ = deepspeed.initialize(model=model, config=cfg,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    from transformers import AutoConfig
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    batch = _long_batch(vocab, seed=rank)
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    with _Largest(vocab) as probe:
        out = tl.token_logps(engine, batch, chunk=8)
        engine.backward(-out.logps.sum())
    with torch.no_grad():
        plain = tl.token_logps(engine, batch, chunked=False)
    result[rank] = (probe.numel, tokens * vocab, float((out.logps.detach() - plain.logps).abs().max()))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_no_tokens_x_vocabulary_tensor_under_deepspeed(tiny_models, stage):
    """ZeRO-2 (through the engine's forward) and ZeRO-3 (the partitioned, frozen head gathered for each chunked
    product, forward and backward): a LoRA training step on two processes creates no [tokens x vocabulary] tensor,
    and its log-probs equal the engine's plain forward's (1e-5)."""
    pytest.importorskip("deepspeed")
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mp.Manager().dict()
    mp.spawn(_zero_worker, args=(tiny_models("qwen2"), port, stage, result), nprocs=2, join=True)
    for rank in range(2):
        largest, full, diff = result[rank]
        assert largest < full // 2 and diff < 1e-5, (stage, rank, largest, full, diff)


def _fsdp_worker(rank, model_dir, port, train_type, result):
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunesmith.train import distributed as D

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if train_type == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    vocab = model.get_output_embeddings().weight.shape[0]
    model = D.shard_model(model, D.fsdp_settings(["full_shard", "auto_wrap"]))
    batch = _long_batch(vocab, seed=rank)
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    probe, out, _ = _step_largest(model, batch)
    with torch.no_grad():
        import tunesmith.train.ops.token_logps as tl
        plain = tl.token_logps(model, batch, chunked=False)
    state = D.full_state_dict(model, trainable_only=False)  # collective: every rank takes part
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            grads[name] = p.grad.full_tensor()
    result[rank] = (probe.numel, tokens * vocab, float((out.logps.detach() - plain.logps).abs().max()),
                    grads if rank == 0 else None, len(state))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("family,train_type", [("qwen2", "lora"), ("llama", "full")])
def test_no_tokens_x_vocabulary_tensor_under_fsdp(tiny_models, family, train_type):
    """FSDP2 (`fully_shard` per decoder layer and on the model, two processes): the log-probs go through the
    sharded model's own forward and its gathered output weight — frozen (LoRA) or trained (full, a Llama's own
    output layer) — never creating a [tokens x vocabulary] tensor; they equal the plain forward's (1e-5), and the
    reduce-scattered gradients equal the average of the two processes' plain-path gradients (1e-5)."""
    import socket

    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    import tunesmith.train.ops.token_logps as tl

    model_dir = tiny_models(family)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mp.Manager().dict()
    mp.spawn(_fsdp_worker, args=(model_dir, port, train_type, result), nprocs=2, join=True)
    for rank in range(2):
        largest, full, diff, _, _ = result[rank]
        assert largest < full // 2 and diff < 1e-5, (rank, largest, full, diff)
    if train_type == "full":
        grads = []
        for rank in range(2):
            model = AutoModelForCausalLM.from_pretrained(model_dir)
            batch = _long_batch(model.get_output_embeddings().weight.shape[0], seed=rank)
            (-tl.token_logps(model, batch, chunked=False).logps.sum()).backward()
            grads.append(_grads(model))
        sharded = result[0][3]
        assert "lm_head.weight" in sharded
        for k, g in sharded.items():
            assert torch.allclose(g, (grads[0][k] + grads[1][k]) / 2, atol=1e-5, rtol=1e-4), k
