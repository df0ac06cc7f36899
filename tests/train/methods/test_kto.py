"""KTO's batches: --padding_free drops the padding within each batch and changes nothing else."""
import pytest
import torch
from conftest import write_jsonl

from tunesmith.config.parser import parse_args
from tunesmith.errors import ConfigError


def _kto_rows():
    return [{"messages": [{"role": "user", "content": "question " * (1 + i % 4) + str(i)},
                          {"role": "assistant", "content": "an answer " * (1 + (3 * i) % 5)}],
             "label": i % 3 != 0} for i in range(6)]


def test_padding_free_losses_and_gradients_equal_the_padded_ones(tiny_models, tmp_path):
    """--padding_free for KTO: the real replies in one row and the mismatched (KL) ones in another, no padding
    between sequences; the loss, every statistic (rewards, log-probs, the KL estimate) and every LoRA gradient equal
    the padded batch's (1e-5, fp32), with fewer positions computed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunesmith.train.config import check, resolve
    from tunesmith.train.methods.kto import KTO, _half, kto_loss
    from tunesmith.train.reference import Reference, sequence_logps
    from tunesmith.train.setup import prepare_data

    data = write_jsonl(tmp_path / "kto.jsonl", _kto_rows())
    model_dir = tiny_models("qwen2")
    results = {}
    for flags in ([], ["--padding_free", "true"]):
        args = parse_args("rlhf", ["--rlhf_type", "kto", "--model", model_dir, "--dataset", data, "--max_length",
                                   "64", "--dataset_shuffle", "false", "--per_device_train_batch_size", "6",
                                   "--output_dir", str(tmp_path / "o"), *flags])
        method = check(args, KTO)
        assert method.padding_free == bool(flags)
        cfg = resolve(args, method, 1, cuda=False)
        prepared = prepare_data(cfg.data, cfg.model, method)
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                               LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        reference = Reference("model", "the base model", model=AutoModelForCausalLM.from_pretrained(model_dir))
        batches = method.batches(cfg, prepared, model, reference)
        batch = batches.collate(list(batches.train))  # all six replies in one batch
        parts, stats = kto_loss(method, reference, model, batch)
        parts["examples"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():  # the KL term's sequences alone (the statistic is clamped at 0)
            kl_logps = sequence_logps(model, _half(batch, 6, 12)).logps
        results[bool(flags)] = (float(parts["examples"].detach()), stats, grads, batch, kl_logps)
    (lp, sp, gp, bp, kp), (lf, sf, gf, bf, kf) = results[False], results[True]
    assert bf["input_ids"].shape[0] == 2 and bp["input_ids"].shape[0] == 12
    assert bf["input_ids"].numel() < bp["input_ids"].numel()  # the padding is gone
    assert abs(lp - lf) < 1e-5
    assert sp.keys() == sf.keys() and all(abs(sp[k] - sf[k]) < 1e-4 for k in sp), (sp, sf)
    assert sp["n_good"] == 4 and sp["n_bad"] == 2
    assert kp.shape == kf.shape == (6,) and torch.allclose(kp, kf, atol=1e-5)
    assert gp.keys() == gf.keys() and len(gp) > 0
    for k in gp:
        assert torch.allclose(gp[k], gf[k], atol=1e-5, rtol=1e-4), k


def test_packing_is_refused_with_the_flag_that_works(tiny_models, tmp_path):
    from tunesmith.train.config import check
    from tunesmith.train.methods.kto import KTO

    data = write_jsonl(tmp_path / "kto.jsonl", _kto_rows())
    args = parse_args("rlhf", ["--rlhf_type", "kto", "--model", tiny_models("qwen2"), "--dataset", data,
                               "--packing", "true", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="--packing is not supported for KTO.*--padding_free true"):
        check(args, KTO)
