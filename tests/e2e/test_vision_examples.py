"""ms-swift's vision-language example command lines (examples/train/multimodal/: ocr.sh, rlhf/dpo/lora.sh,
rlhf/kto.sh, vit_gradient_checkpointing.sh) with `swift` -> `tunesmith`: flags verbatim except the model, the data,
the step counts, and torchrun / --deepspeed (tests/e2e/test_distributed.py runs those launchers)."""
import os

import pytest

from conftest import COLOURS, colour_rows, write_jsonl
from tunesmith.cli import main


def _common(model, data, out):
    return ["--model", model, "--dataset", data, "--torch_dtype", "bfloat16", "--num_train_epochs", "1",
            "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1", "--learning_rate", "1e-4",
            "--gradient_accumulation_steps", "2", "--eval_steps", "50", "--save_steps", "50",
            "--save_total_limit", "2", "--logging_steps", "5", "--output_dir", str(out), "--warmup_ratio", "0.05",
            "--dataloader_num_workers", "4", "--max_steps", "2", "--report_to", "none"]


def _lora():
    return ["--train_type", "lora", "--lora_rank", "8", "--lora_alpha", "32", "--target_modules", "all-linear",
            "--freeze_vit", "true"]


def _ran(out):
    run = next(p for p in os.listdir(out) if p.startswith("v0-"))
    return os.path.join(out, run)


@pytest.mark.slow
def test_ocr_sh(tiny_vl_models, tmp_path, monkeypatch, capsys):
    """examples/train/multimodal/ocr.sh: MAX_PIXELS=1003520 swift sft ... --freeze_vit true --max_length 2048."""
    monkeypatch.setenv("MAX_PIXELS", "1003520")
    data = write_jsonl(tmp_path / "d.jsonl", colour_rows(tmp_path / "p", 8))
    rc = main(["sft", *_common(tiny_vl_models("qwen2_5_vl"), data, tmp_path / "out"), *_lora(),
               "--max_length", "2048"])
    assert rc == 0, capsys.readouterr().err
    assert "1,003,520 pixels" in capsys.readouterr().err
    assert os.path.isfile(os.path.join(_ran(tmp_path / "out"), "checkpoint-2", "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("rlhf_type", ["dpo", "kto"])
def test_rlhf_dpo_lora_sh_and_kto_sh(tiny_vl_models, tmp_path, monkeypatch, capsys, rlhf_type):
    """examples/train/multimodal/rlhf/dpo/lora.sh (--rpo_alpha 0.1, --split_dataset_ratio 0.01,
    --load_from_cache_file true, --dataset_num_proc 4) and rlhf/kto.sh, on Qwen3-VL."""
    monkeypatch.setenv("MAX_PIXELS", "1003520")
    rows = colour_rows(tmp_path / "p", 12)
    names = sorted(COLOURS)
    other = {c: names[(names.index(c) + 1) % 3] for c in names}
    if rlhf_type == "dpo":
        rows = [{**r, "rejected_response": other[r["messages"][1]["content"]]} for r in rows]
        extra = ["--rpo_alpha", "0.1", "--load_from_cache_file", "true"]
    else:  # kto.sh's --per_device_train_batch_size 1 is refused here as by TRL's KTOTrainer, which ms-swift runs:
        # KTO's KL term comes from the other examples of the batch
        rows = [{**r, "label": i % 2 == 0} for i, r in enumerate(rows)]
        extra = ["--per_device_train_batch_size", "2"]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    rc = main(["rlhf", "--rlhf_type", rlhf_type, *_common(tiny_vl_models("qwen3_vl"), data, tmp_path / "out"),
               *_lora(), "--split_dataset_ratio", "0.01", "--max_length", "4096", "--dataset_num_proc", "4", *extra])
    assert rc == 0, capsys.readouterr().err


@pytest.mark.slow
def test_vit_gradient_checkpointing_sh(tiny_vl_models, tmp_path, capsys):
    """examples/train/multimodal/vit_gradient_checkpointing.sh: full training of the vision tower and aligner too,
    --gradient_checkpointing false --vit_gradient_checkpointing true, --padding_free true, --use_liger_kernel true,
    --attn_impl flash_attn (sdpa on a CPU, said in a note), --save_only_model true."""
    data = write_jsonl(tmp_path / "d.jsonl", colour_rows(tmp_path / "p", 8))
    common = _common(tiny_vl_models("qwen2_5_vl"), data, tmp_path / "out")
    common[common.index("--learning_rate") + 1] = "1e-5"
    rc = main(["sft", *common, "--split_dataset_ratio", "0.01", "--train_type", "full", "--freeze_vit", "false",
               "--freeze_aligner", "false", "--gradient_checkpointing", "false", "--vit_gradient_checkpointing",
               "true", "--max_length", "2048", "--use_liger_kernel", "true", "--attn_impl", "flash_attn",
               "--padding_free", "true", "--save_only_model", "true"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "sdpa on this CPU run" in err
    assert os.path.isfile(os.path.join(_ran(tmp_path / "out"), "checkpoint-2", "model.safetensors"))
