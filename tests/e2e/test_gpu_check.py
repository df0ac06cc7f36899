"""bench/gpu_check.py --dry-run: the GPU check's whole code path on the CPU with tiny shapes, so the script is known
to work before a GPU is lent. Every case must come back with its numbers or a stated reason for skipping it."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

TRAIN_CASES = ("sft_sdpa", "dpo_sdpa", "sft_flash_attn", "dpo_flash_attn", "sft_sdpa_liger", "dpo_sdpa_liger")
MEMORY_CASES = ("lora_dpo_7b", "qlora_dpo_7b")
SERVE_CASES = ("serve_64_clients", "serve_vllm_64_clients")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and v >= 0


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu_check.py"), "--dry-run", "--out",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True
    env = report["environment"]
    assert env["torch"] and env["transformers"] and env["peft"] and _number(env["peak_tflops"]), env
    cases = report["cases"]
    assert set(cases) == set(TRAIN_CASES + MEMORY_CASES + SERVE_CASES)
    for name, r in cases.items():
        if r["status"] == "skipped":  # only for a stated reason: a missing optional package or no GPU
            assert r["reason"], name
            assert "not installed" in r["reason"] or "needs a CUDA GPU" in r["reason"] or \
                "does not import" in r["reason"], (name, r["reason"])
            continue
        assert r["status"] == "ok", (name, r)
        if name in SERVE_CASES:
            assert r["ok"] == 64 and r["failures"] == 0, r
            assert all(_number(r[k]) for k in ("tok_s", "req_s", "p50_s", "p95_s", "peak_rss_gib")), r
            continue
        assert r["command"].startswith(("tunesmith sft ", "tunesmith rlhf ")), r["command"]
        assert all(_number(r[k]) for k in ("tokens_per_s", "tokens_per_s_loop", "peak_memory_gib")), (name, r)
        assert r["steps"] >= 1 and r["loss_last"] == r["loss_last"], (name, r)  # trained, finite loss
        if name in TRAIN_CASES:
            assert _number(r["mfu"]) and _number(r["model_flops_per_token"]), (name, r)
    # the cases every machine runs (no optional package needed)
    for name in ("sft_sdpa", "dpo_sdpa", "lora_dpo_7b", "serve_64_clients"):
        assert cases[name]["status"] == "ok", (name, cases[name])
    assert "--quant_method bnb" in cases["qlora_dpo_7b"].get("command", "--quant_method bnb") or \
        cases["qlora_dpo_7b"]["status"] == "skipped"
    md = out.with_suffix(".md")
    assert md.exists()
    table = md.read_text()
    for name in cases:
        assert f"| {name} |" in table
