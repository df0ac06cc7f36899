"""`tunesmith export --safe_serialization false` writes PyTorch .bin shards (transformers 5's save_pretrained writes
safetensors only, so tunesmith rewrites them), and the result loads back with the merged weights."""
import json
import os

import pytest
import torch

from tunesmith.config.parser import parse_args


@pytest.fixture(scope="module")
def base_and_adapter(tiny_models, tmp_path_factory):
    """A tiny base model and a LoRA adapter on it whose B matrices are non-zero (so merging changes the weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tiny_models("qwen2")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapter = str(tmp_path_factory.mktemp("adapter"))
    model.save_pretrained(adapter)
    return base, adapter


def _logits(path, ids):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
def test_safe_serialization_false_writes_pytorch_bin(base_and_adapter, tmp_path):
    from tunesmith.commands import export

    base, adapter = base_and_adapter
    outs = {}
    for safe, shard in (("true", "200KB"), ("false", "200KB"), ("false", "5GB")):
        out = outs[safe, shard] = str(tmp_path / f"merged-{safe}-{shard}")
        export.main(parse_args("export", ["--model", base, "--adapters", adapter, "--merge_lora", "true",
                                          "--safe_serialization", safe, "--max_shard_size", shard,
                                          "--output_dir", out]))
    sharded, single = os.listdir(outs["false", "200KB"]), os.listdir(outs["false", "5GB"])
    for files in (sharded, single):
        assert not [f for f in files if f.endswith(".safetensors") or f == "model.safetensors.index.json"]
        assert "config.json" in files and "tokenizer.json" in files and "args.json" in files
    assert sorted(f for f in single if f.endswith(".bin")) == ["pytorch_model.bin"]
    # sharded: pytorch_model-0000i-of-0000n.bin and pytorch_model.bin.index.json naming them, the same tensors as
    # the safetensors export
    bins = sorted(f for f in sharded if f.endswith(".bin"))
    assert len(bins) > 1 and all(f.startswith("pytorch_model-") for f in bins)
    index = json.load(open(os.path.join(outs["false", "200KB"], "pytorch_model.bin.index.json")))
    assert sorted(set(index["weight_map"].values())) == bins
    safe_index = json.load(open(os.path.join(outs["true", "200KB"], "model.safetensors.index.json")))
    assert sorted(index["weight_map"]) == sorted(safe_index["weight_map"])
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    reference = _logits(outs["true", "200KB"], ids)
    assert torch.equal(_logits(outs["false", "200KB"], ids), reference)
    assert torch.equal(_logits(outs["false", "5GB"], ids), reference)
    assert (reference - _logits(base, ids)).abs().max() > 1e-3  # the merge is in the weights


@pytest.mark.parametrize("size", ["abc", "0", "0GB", "1.5GB", "-1GB", ""])
def test_a_max_shard_size_transformers_cannot_read_is_a_flag_problem(tmp_path, capsys, size):
    """Found before the model loads (exit 2), naming the value and the form it takes."""
    from tunesmith.cli import main

    rc = main(["export", "--adapters", str(tmp_path), "--merge_lora", "true", "--max_shard_size", size,
               "--output_dir", str(tmp_path / "merged")])
    err = capsys.readouterr().err
    assert rc == 2 and f"--max_shard_size {size}: expected a whole number of at least 1 and a unit, e.g. 5GB" in err
    assert "Traceback" not in err and not (tmp_path / "merged").exists()


def test_export_to_a_full_disk_is_one_message_and_leaves_nothing(base_and_adapter, tmp_path, monkeypatch):
    """torch's/safetensors' words for a full disk while the merged model is written: one message, no folder."""
    import tunesmith.commands.export as export
    import tunesmith.export.merge as merge
    import tunesmith.files as files
    from tunesmith.errors import TunesmithError

    base, adapter = base_and_adapter

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 456")
    monkeypatch.setattr(merge, "save_weights", full)
    monkeypatch.setattr(files, "FULL_BELOW", 1 << 62)
    out = tmp_path / "merged"
    with pytest.raises(TunesmithError, match=rf"could not write the merged model \({out}\): the disk is full; "
                                             r"nothing was left half-written"):
        export.main(parse_args("export", ["--model", base, "--adapters", adapter, "--merge_lora", "true",
                                          "--output_dir", str(out)]))
    assert sorted(p.name for p in tmp_path.iterdir()) == []
