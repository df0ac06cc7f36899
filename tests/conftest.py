import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples", "data")


@pytest.fixture(autouse=True, scope="session")
def _encoded_data_cache(tmp_path_factory):
    """Encoded datasets (tunesmith.data.store) go to a session folder, never the user's ~/.cache; subprocesses
    started by tests inherit it."""
    old = os.environ.get("HF_DATASETS_CACHE")
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf_datasets_cache"))
    yield
    if old is None:
        os.environ.pop("HF_DATASETS_CACHE", None)
    else:
        os.environ["HF_DATASETS_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny random models for each family, built once per test session (a few seconds)."""
    from tunesmith.testing import build_model

    root = tmp_path_factory.mktemp("models")
    cache = {}

    def get(family="qwen2", **kw):
        key = (family, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = build_model(str(root / f"{family}-{len(cache)}"), family, **kw)
        return cache[key]

    return get


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def read_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def seed_gpt_oss_dpo_argv(model, data, out, accumulation="4", logging="5"):
    """../shared/seeds/000's DPO command line, flags verbatim except the paths and the step counts."""
    return ["rlhf", "--rlhf_type", "dpo", "--model", model, "--dataset", data,
            "--train_type", "lora", "--torch_dtype", "bfloat16", "--num_train_epochs", "1",
            "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "1", "--learning_rate", "4e-4",
            "--lora_rank", "8", "--lora_alpha", "32", "--target_modules", "all-linear",
            "--gradient_accumulation_steps", accumulation, "--save_strategy", "epoch", "--save_total_limit", "5",
            "--logging_steps", logging, "--max_length", "8192", "--output_dir", str(out), "--warmup_ratio", "0.05",
            "--dataloader_num_workers", "4", "--use_liger_kernel", "true", "--load_from_cache_file", "false",
            "--loss_scale", "ignore_empty_think", "--save_strategy", "epoch", "--model_author", "gxb",
            "--model_name", "gxb-gpt-oss-20b-dpo", "--report_to", "swanlab", "--swanlab_project", "swift-robot"]
