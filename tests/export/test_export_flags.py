"""`tunesmith export`'s flags for GGUF, Ollama and quantised checkpoints: every refused value or combination is one
message before anything loads (exit 2 for flag values, 1 for what the model or checkpoint cannot do), and the
defaults follow ms-swift's layout (<checkpoint>-<suffix>)."""
import os

import pytest

from conftest import cli, cli_error
from tunesmith.config.parser import parse_args


@pytest.mark.parametrize("argv, message", [
    (["--to_gguf", "true", "--gguf_quant", "q4_k_n"], "q4_k_m"),                    # a typo: the nearest type
    (["--gguf_quant", "q4_k_m"], "--gguf_quant chooses the GGUF types: pass --to_gguf true with it"),
    (["--to_gguf", "true", "--quant_method", "bnb"], "one export per command"),
    (["--to_ollama", "true", "--quant_method", "bnb"], "are two exports: Ollama runs GGUF files"),
    (["--quant_bits", "4", "--merge_lora", "true"], "--quant_bits goes with --quant_method"),
    (["--quant_method", "awq"], "awq"),
    (["--to_gguf", "true", "--gguf_quant", "iq2_xs"], "IQ2_XS needs an importance matrix"),
    (["--to_gguf", "true", "--gguf_quant", "q4_k,q8_0"], "separate the types with spaces: --gguf_quant q4_k q8_0"),
    (["--to_gguf", "true", "--gguf_quant", "Q4_K"], "write llama.cpp's Q4_K as q4_k_m"),
    (["--to_gguf", "true", "--gguf_quant"], "--gguf_quant: give at least one type"),
    (["--to_gguf", "true", "--max_shard_size", "2GB"], "--max_shard_size shapes a Hugging Face folder"),
    (["--to_gguf", "true", "--safe_serialization", "false"], "--safe_serialization shapes a Hugging Face folder"),
    (["--quant_method", "bnb", "--quant_bits", "3"], "bnb"),
    (["--quant_method", "bnb"], "--quant_bits"),
    (["--quant_method", "gptq", "--group_size", "0"], "--group_size 0: expected -1"),
    (["--quant_method", "gptq", "--dataset", "x.jsonl", "--quant_n_samples", "0"], "--quant_n_samples 0"),
])
def test_bad_export_flags_are_one_message_before_loading(capsys, tmp_path, argv, message):
    rc, _, err = cli(capsys, "export", "--model", tmp_path, *argv)
    assert rc == 2 and err.count("tunesmith export: error:") == 1 and message in err, err
    assert os.listdir(tmp_path) == []


def test_an_export_flag_in_training_says_where_it_belongs(capsys):
    for flag in ("--to_ollama", "--to_gguf", "--quant_n_samples"):
        rc, line = cli_error(capsys, "sft", "--model", "m", "--dataset", "d.jsonl", flag, "1")
        assert rc == 2 and "tunesmith export --adapters CKPT --to_gguf true" in line, line


def test_quant_methods_for_training_point_to_export(capsys):
    rc, line = cli_error(capsys, "sft", "--model", "m", "--dataset", "d.jsonl", "--quant_method", "gptq")
    assert rc == 2 and "tunesmith export --quant_method gptq" in line, line


def test_nothing_to_export_says_what_can_be(capsys, tmp_path):
    rc, _, line = cli(capsys, "export", "--model", tmp_path)
    assert rc == 2 and "--to_gguf true" in line and "--merge_lora true" in line and "--quant_method" in line


def test_default_output_dirs_follow_ms_swift(tmp_path):
    from tunesmith.commands.export import default_output_dir, export_stem
    from tunesmith.config.groups import ExportOutputArgs
    from tunesmith.config.slices import take

    ckpt = tmp_path / "v0-x" / "checkpoint-50"
    ckpt.mkdir(parents=True)

    def out(*argv):
        cfg = take(ExportOutputArgs, parse_args("export", ["--adapters", str(ckpt), *argv]))
        from tunesmith.commands.export import export_kind
        return default_output_dir(export_kind(cfg), cfg, [str(ckpt)], "Qwen/Qwen2.5-0.5B-Instruct")

    assert out("--merge_lora", "true") == f"{ckpt}-merged"
    assert out("--to_gguf", "true", "--to_ollama", "true") == f"{ckpt}-gguf"
    assert out("--to_ollama", "true") == f"{ckpt}-ollama"
    assert out("--quant_method", "bnb", "--quant_bits", "4") == f"{ckpt}-bnb-int4"
    assert out("--quant_method", "fp8") == f"{ckpt}-fp8"
    assert out("--quant_method", "gptq", "--quant_bits", "8") == f"{ckpt}-gptq-int8"
    assert export_stem("Qwen/Qwen2.5-0.5B-Instruct", [str(ckpt)]) == "Qwen2.5-0.5B-Instruct-checkpoint-50"
    assert export_stem(str(tmp_path / "my-model") + "/", []) == "my-model"


def test_gguf_size_estimate_and_the_free_space_refusal(tmp_path, monkeypatch):
    """Sizes from llama.cpp's block sizes (q8_0: 34 bytes per 32 weights); a K-quant without a float type asked
    adds the float intermediate; too little space is refused before anything is written."""
    import shutil
    import types

    from tunesmith.errors import ConfigError
    from tunesmith.export.sizes import bytes_per_weight, check_free_space, gguf_bytes

    assert bytes_per_weight("f16") == 2.0 and bytes_per_weight("q8_0") == 34 / 32
    assert bytes_per_weight("q4_k_s") == 144 / 256 and bytes_per_weight("q4_k_m") == 176 / 256  # Q5_K's size
    src = types.SimpleNamespace(shapes={"w": (1000, 1000)}, dtypes={"w": "bfloat16"})
    overhead = 16 << 20
    assert gguf_bytes(src, ["f16"]) == int(2e6 * 1.02) + overhead
    assert gguf_bytes(src, ["q4_k_m"]) == int((1e6 * 176 / 256 + 2e6) * 1.02) + overhead  # + the bf16 intermediate
    assert gguf_bytes(src, ["bf16", "q4_k_m"]) == int((2e6 + 1e6 * 176 / 256) * 1.02) + overhead
    # an f32 model quantises from an f32 intermediate even when f16 is asked for (the fresh-user run's tmpfs)
    f32 = types.SimpleNamespace(shapes={"w": (1000, 1000), "norm": (1000,)}, dtypes={"w": "float32", "norm": "float32"})
    n = 1e6 + 1e3
    assert gguf_bytes(f32, ["f16", "q8_0", "q4_k_m"]) == int(n * (2 + 34 / 32 + 176 / 256 + 4) * 1.02) + overhead
    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(free=1 << 30))
    with pytest.raises(ConfigError, match=r"need about 2\.00 GiB and .* has 1\.00 GiB free; .*nothing was written"):
        check_free_space(str(tmp_path / "out"), 2 << 30, "the GGUF files")
    check_free_space(str(tmp_path / "out"), 1 << 29, "the GGUF files")
    assert not os.path.exists(tmp_path / "out")


def test_export_help_lists_the_new_flags(capsys):
    rc, out, _ = cli(capsys, "export", "--help")
    for flag in ("--to_gguf", "--gguf_quant", "--to_ollama", "--quant_method", "--quant_n_samples", "--group_size"):
        assert flag in out
