"""--train_type adalora, vera, boft, fourierft, bone and llamapro, and LoRA started from PiSSA or OLoRA
(docs/tuners.md), on a tiny model: each learns, saves ms-swift's checkpoint layout, resumes exactly, loads back in
plain peft (LLaMA-Pro: plain transformers), merges into the base with the same logits, and is served by infer and
deploy. The flags are ms-swift 4.6's names with its defaults; what is refused says why."""
import json
import os

import pytest
import torch

from conftest import cli_error, losses_by_step, start_deploy, write_jsonl
from tunesmith.config.parser import ArgError, parse_args
from tunesmith.errors import ConfigError

# train_type flags, learning rate, and how far the loss must fall from step 1 to step 6 (nats per token; AdaLoRA's
# loss carries its orthogonality penalty, which falls too)
TUNERS = {
    "adalora": (["--train_type", "adalora"], "2e-2", 1.0),
    "vera": (["--train_type", "vera"], "1e-1", 0.1),
    "boft": (["--train_type", "boft"], "2e-2", 0.2),
    "fourierft": (["--train_type", "fourierft"], "2e-2", 0.2),
    "bone": (["--train_type", "bone"], "5e-3", 0.2),
    "llamapro": (["--train_type", "llamapro", "--llamapro_num_new_blocks", "2"], "1e-2", 0.2),
    "pissa": (["--train_type", "lora", "--init_weights", "pissa"], "5e-3", 0.2),
    "olora": (["--train_type", "lora", "--init_weights", "olora"], "5e-3", 0.2),
    "lora_ga": (["--train_type", "lora", "--init_weights", "lora-ga"], "5e-3", 0.5),
}
PEFT_TYPE = {"adalora": "ADALORA", "vera": "VERA", "boft": "BOFT", "fourierft": "FOURIERFT", "bone": "MISS",
             "pissa": "LORA", "olora": "LORA", "lora_ga": "LORA"}
QUESTION = [{"role": "user", "content": "say red blue"}]
CONVERTED = ("pissa", "olora", "lora_ga")  # LoRA starts that change the base weights: saved converted


def _run(argv):
    from tunesmith.train import recipe

    return recipe.main(parse_args("sft", [str(a) for a in argv]))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = [{"messages": [QUESTION[0], {"role": "assistant", "content": "red blue green"}]}] * 16
    return write_jsonl(tmp_path_factory.mktemp("data") / "rows.jsonl", rows)


@pytest.fixture(scope="module", params=list(TUNERS))
def trained(request, tiny_models, data, tmp_path_factory):
    """Six steps of one tuner (checkpoints at 3 and 6), and the same run resumed from checkpoint-3."""
    import tunesmith.runs.report

    flags, lr, margin = TUNERS[request.param]
    model_dir = tiny_models("qwen2")
    out = tmp_path_factory.mktemp(request.param)
    common = ["--model", model_dir, "--dataset", data, *flags, "--max_steps", "6", "--save_steps", "3",
              "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
              "--learning_rate", lr, "--lr_scheduler_type", "constant", "--warmup_ratio", "0", "--report_to", "none",
              "--gradient_checkpointing", "false"]
    with pytest.MonkeyPatch.context() as mp:  # the runs compare numbers; their charts would only cost time
        mp.setattr(tunesmith.runs.report, "write_run_report", lambda run_dir: "not written (test)")
        full = _run(common + ["--output_dir", out / "full"])
        ckpt3 = os.path.join(full["run_dir"], "checkpoint-3")
        resumed = _run(common + ["--output_dir", out / "resumed", "--resume_from_checkpoint", ckpt3])
    return {"name": request.param, "margin": margin, "model_dir": model_dir, "model": full["model"],
            "ckpt": full["state"].last_model_checkpoint, "ckpt3": ckpt3,
            "losses": losses_by_step(full["run_dir"]), "resumed": losses_by_step(resumed["run_dir"])}


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)("say red blue green white", return_tensors="pt")["input_ids"]


def _load(t):
    """The checkpoint loaded the plain way: peft on the base model (LLaMA-Pro: transformers alone)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if t["name"] == "llamapro":
        return AutoModelForCausalLM.from_pretrained(t["ckpt"])
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(t["model_dir"]), t["ckpt"])


@pytest.mark.slow
def test_learns_and_saves_ms_swift_layout(trained):
    losses, name = trained["losses"], trained["name"]
    print(f"\n{name}: loss {losses[1]:.4f} -> {losses[6]:.4f}")
    assert losses[6] <= losses[1] - trained["margin"], losses
    files = set(os.listdir(trained["ckpt"]))
    assert {"args.json", "trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= files
    args = json.load(open(os.path.join(trained["ckpt"], "args.json")))
    assert args["train_type"] == ("lora" if name in CONVERTED else name)
    if name == "llamapro":  # the whole expanded model: 2 layers + 2 new blocks
        assert {"config.json", "model.safetensors"} <= files and "adapter_config.json" not in files
        assert json.load(open(os.path.join(trained["ckpt"], "config.json")))["num_hidden_layers"] == 4
        return
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    config = json.load(open(os.path.join(trained["ckpt"], "adapter_config.json")))
    assert config["peft_type"] == PEFT_TYPE[name] and config["task_type"] == "CAUSAL_LM"
    if name in CONVERTED:  # converted to a plain LoRA that fits the original base: rank 2r, scale kept
        assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (16, 64, True)
    if name == "adalora":  # total_step is the run's; the final budget keeps target_r ranks per matrix on average
        kept = [sum(v) for v in config["rank_pattern"].values()]
        assert config["total_step"] == 6 and sum(kept) == 8 * len(kept) and max(kept) <= 12


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(trained):
    a, b = trained["losses"], trained["resumed"]
    assert sorted(b) == [1, 2, 3, 4, 5, 6]  # steps 1-3 come from the checkpoint's log
    diff = max(abs(a[s] - b[s]) for s in (4, 5, 6))
    print(f"\n{trained['name']}: resumed steps 4-6 differ by at most {diff:.2e}")
    assert diff < 1e-6, (a, b)


@pytest.mark.slow
def test_loads_back_and_merges_with_the_same_logits(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    from tunesmith.cli import main

    ids = _ids(trained["model_dir"])
    trained_logits = _logits(trained["model"], ids)
    loaded = _logits(_load(trained), ids)
    base = _logits(AutoModelForCausalLM.from_pretrained(trained["model_dir"]), ids)
    with capsys.disabled():  # the numbers, for the record (-s)
        print(f"\n{trained['name']}: loaded vs trained {(loaded - trained_logits).abs().max():.2e}")
    assert (loaded - trained_logits).abs().max() < 1e-5
    assert (loaded - base).abs().max() > 1e-3  # it learned something the base model does not have
    if trained["name"] == "llamapro":  # the checkpoint is the whole model: nothing to merge, and no adapter
        rc, line = cli_error(capsys, "export", "--adapters", trained["ckpt"], "--merge_lora", "true")
        assert rc == 1 and f"pass it with --model {trained['ckpt']}" in line
        return
    out = str(tmp_path / "merged")
    assert main(["export", "--adapters", trained["ckpt"], "--merge_lora", "true", "--output_dir", out]) == 0
    merged = _logits(AutoModelForCausalLM.from_pretrained(out), ids)
    with capsys.disabled():
        print(f"{trained['name']}: merged vs adapter {(merged - loaded).abs().max():.2e}")
    assert (merged - loaded).abs().max() < 1e-5


@pytest.mark.slow
def test_infer_serves_the_checkpoint_as_peft_does(trained):
    from transformers import AutoTokenizer
    from tunesmith.inference.chat import ChatEngine, GenConfig, build_engine

    where = ["--model", trained["ckpt"]] if trained["name"] == "llamapro" else ["--adapters", trained["ckpt"]]
    engine = build_engine(parse_args("infer", where + ["--max_new_tokens", "6", "--temperature", "0"]))[0]
    local = ChatEngine(_load(trained), AutoTokenizer.from_pretrained(trained["ckpt"]))
    try:
        cfg = GenConfig(max_new_tokens=6, temperature=0)
        got, want = engine.generate([QUESTION], cfg)[0], local.generate([QUESTION], cfg)[0]
        assert (got.content, got.completion_tokens) == (want.content, want.completion_tokens)
    finally:
        engine.close()
        local.close()


@pytest.mark.slow
def test_deploy_serves_an_adalora_adapter(tiny_models, data, tmp_path):
    """A real server process over an AdaLoRA checkpoint (plain --adapters: the base and the adapter applied live)
    answers as peft's model does; beside another adapter by name it is refused, saying why."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from conftest import http_json
    from tunesmith.inference.chat import ChatEngine, GenConfig
    from tunesmith.models.checkpoint import side_by_side_problems

    res = _run(["--model", tiny_models("qwen2"), "--dataset", data, "--train_type", "adalora", "--max_steps", "2",
                "--output_dir", tmp_path / "a", "--report_to", "none", "--learning_rate", "2e-2"])
    ckpt = res["state"].last_model_checkpoint
    proc, port = start_deploy("--adapters", ckpt, "--max_new_tokens", "6", "--verbose", "false")
    try:
        status, body = http_json("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                                 {"model": os.path.basename(ckpt), "messages": QUESTION, "temperature": 0})
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    local = ChatEngine(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models("qwen2")), ckpt),
                       AutoTokenizer.from_pretrained(ckpt))
    try:
        want = local.generate([QUESTION], GenConfig(max_new_tokens=6, temperature=0))[0]
    finally:
        local.close()
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == want.content
    problems = side_by_side_problems({"ada": ckpt})
    assert len(problems) == 1
    assert "an adapter of peft type ADALORA; peft chooses only LoRA adapters per request" in problems[0]


@pytest.mark.slow
@pytest.mark.parametrize("flags, kind", [(["--train_type", "vera"], "adapter_off"),
                                         (["--train_type", "bone"], "adapter_off"),
                                         (["--train_type", "llamapro", "--llamapro_num_new_blocks", "2"], "model")])
def test_dpo_starts_from_its_reference(tiny_models, tmp_path, flags, kind):
    """DPO with a tuner that starts as the identity: the reference is the adapter switched off (a peft tuner) or the
    base model (LLaMA-Pro, whose new blocks add nothing at the start), so step 1's loss is ln 2 with zero margins."""
    import math

    from conftest import read_jsonl
    from tunesmith.train import recipe

    rows = [{"prompt": f"Which can you eat: {g} or rock?", "chosen": f"The {g}.", "rejected": "The rock."}
            for g in "apple pear plum peach grape lemon mango melon".split()]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    res = recipe.main(parse_args("rlhf", ["--rlhf_type", "dpo", "--model", tiny_models("qwen2"), "--dataset", data,
                                          *flags, "--max_steps", "1", "--per_device_train_batch_size", "4",
                                          "--output_dir", str(tmp_path / "o"), "--report_to", "none",
                                          "--logging_steps", "1"]))
    first = next(r for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "rewards/margins" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/margins"] == 0
    assert res["reference"].kind == kind


# ------------------------------------------------------------------ the flags, and what is refused (no training)

def test_flags_are_ms_swift_names_with_its_defaults():
    """The defaults of ms-swift 4.6's TunerArguments (swift/arguments/tuner_args.py: the dataclass fields, which
    differ from its docstring for AdaLoRA's schedule)."""
    args = parse_args("sft", ["--train_type", "adalora"])
    expect = {"adalora_target_r": 8, "adalora_init_r": 12, "adalora_tinit": 0, "adalora_tfinal": 0,
              "adalora_deltaT": 1, "adalora_beta1": 0.85, "adalora_beta2": 0.85, "adalora_orth_reg_weight": 0.5,
              "vera_rank": 256, "vera_projection_prng_key": 0, "vera_dropout": 0.0, "vera_d_initial": 0.1,
              "boft_block_size": 4, "boft_block_num": 0, "boft_n_butterfly_factor": 1, "boft_dropout": 0.0,
              "fourier_n_frequency": 2000, "fourier_scaling": 300.0, "reft_rank": 4,
              "llamapro_num_new_blocks": 4, "llamapro_num_groups": None, "init_weights": "true",
              "lora_ga_batch_size": 2, "lora_ga_iters": 2, "lora_ga_max_length": 1024, "lora_ga_direction": "ArB2r",
              "lora_ga_scale": "stable", "lora_ga_stable_gamma": 16}
    assert {k: getattr(args, k) for k in expect} == expect
    for kind in ("vera", "boft", "fourierft", "bone", "llamapro"):
        assert parse_args("rlhf", ["--tuner_type", kind]).train_type == kind  # ms-swift 4's name of the flag


@pytest.mark.parametrize("value, reason", [
    ("longlora", "LongLoRA is not supported yet: it is ms-swift's own patch of Llama's attention"),
    ("reft", "pyreft 0.1.0, its library, pins transformers==4.45.1"),
    ("adapter", "AdapterHub's adapters 1.3 pins transformers ~=4.57")])
def test_tuners_without_a_library_are_refused_with_the_reason(value, reason):
    with pytest.raises(ArgError, match=reason):
        parse_args("sft", ["--train_type", value])


@pytest.mark.parametrize("argv, problem", [
    (["--train_type", "boft", "--boft_block_num", "8"], "BOFT takes one of them"),
    (["--train_type", "adalora", "--max_steps", "5", "--adalora_tinit", "3", "--adalora_tfinal", "2"],
     "leave no step of --max_steps 5"),
    (["--train_type", "adalora", "--adalora_target_r", "16"], "--adalora_target_r 16: expected 1 <= adalora_target_r "
                                                              "<= 12"),
    (["--train_type", "vera", "--use_dora", "true"], "--use_dora is LoRA's; --train_type vera has no such variant"),
    (["--train_type", "fourierft", "--quant_method", "bnb"], "--train_type fourierft on a quantised base is not "
                                                             "supported yet"),
    (["--train_type", "bone", "--init_weights", "pissa"], "--train_type bone takes true, false, bat"),
    (["--init_weights", "loftq"], "LoftQ replaces the base weights with their 4-bit quantised form"),
    (["--init_weights", "lora-ga", "--streaming", "true"], "which cannot be done with --streaming"),
    (["--init_weights", "lora-ga", "--quant_method", "bnb"], "peft needs full-precision gradients"),
    (["--init_weights", "eva"], "EVA initialises from the SVD of activations"),
    (["--init_weights", "corda"], "CorDA initialises from activation covariances"),
    (["--init_weights", "nonsense"], "not a LoRA initialisation"),
    (["--init_weights", "orthogonal", "--lora_rank", "5"], "--lora_rank must be even, not 5"),
])
def test_tuner_flag_problems_are_found_before_anything_loads(tiny_models, tmp_path, argv, problem):
    from tunesmith.train.config import problems

    args = parse_args("sft", ["--model", tiny_models("qwen2"), "--dataset", str(tmp_path / "x.jsonl"), *argv])
    assert any(problem in p for p in problems(args)), problems(args)


def test_llamapro_expansion_keeps_the_outputs_and_trains_only_new_blocks(tiny_models):
    """4 layers, 2 new blocks: layers 0 1 new 2 3 new; the expanded model's logits (and cached greedy generation)
    equal the original's; the new blocks alone are trainable; each attention knows its new index."""
    from transformers import AutoModelForCausalLM
    from tunesmith.models.tuners import expand_blocks

    model_dir = tiny_models("qwen2", layers=4)
    original, model = (AutoModelForCausalLM.from_pretrained(model_dir) for _ in range(2))
    assert expand_blocks(model, 2, None) == [2, 5]
    assert model.config.num_hidden_layers == 6 and len(model.config.layer_types) == 6
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(6))
    trainable = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"2", "5"}
    ids = _ids(model_dir)
    assert (_logits(model, ids) - _logits(original, ids)).abs().max() == 0
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False),
                       original.generate(ids, max_new_tokens=5, do_sample=False))
    with pytest.raises(ConfigError, match="4 decoder layers must be a multiple of it.*1, 2, 4"):
        expand_blocks(AutoModelForCausalLM.from_pretrained(model_dir), 3, None)


def test_vera_targets_the_layers_of_v_proj_shape_as_ms_swift_does(tiny_models):
    from transformers import AutoModelForCausalLM
    from tunesmith.models.load import all_linear_names
    from tunesmith.models.tuners import _one_shape

    model = AutoModelForCausalLM.from_pretrained(tiny_models("qwen2"))
    assert _one_shape(model, all_linear_names(model)) == ["k_proj", "v_proj"]  # 64 -> 32, the GQA projections
    with pytest.raises(ConfigError, match="need one shape"):
        _one_shape(model, ["q_proj", "o_proj", "up_proj"])


def test_adapters_peft_cannot_use_are_refused_by_name(tmp_path):
    from tunesmith.models.checkpoint import adapter_problem

    def adapter(name, **config):
        os.makedirs(tmp_path / name)
        json.dump(config, open(tmp_path / name / "adapter_config.json", "w"))
        return str(tmp_path / name)

    swift = adapter("swift", swift_type="LLAMAPRO", num_new_blocks=4)
    assert "an ms-swift LLAMAPRO adapter, saved in ms-swift's own format" in adapter_problem(swift)
    vera = adapter("vera", peft_type="VERA")
    assert "a VERA adapter, but --train_type is lora" in adapter_problem(vera, train_type="lora")
    assert "pass --train_type vera" in adapter_problem(vera, train_type="lora")
    assert adapter_problem(vera, train_type="vera") is None and adapter_problem(vera, merge=True) is None
    prompt = adapter("prompt", peft_type="PROMPT_TUNING")
    assert "peft cannot merge it" in adapter_problem(prompt, merge=True)
    # vLLM, SGLang and LMDeploy apply LoRA only: another tuner is refused, saying to merge it first
    from tunesmith.config.slices import EngineConfig
    from tunesmith.inference.backends.common import engine_adapters

    with pytest.raises(ConfigError, match=r"\(VERA\): the accelerated engines serve LoRA adapters only; merge it"):
        engine_adapters(EngineConfig(adapters=[vera]))


def test_a_start_moved_out_of_the_base_is_no_reference_for_dpo(tiny_models, tmp_path):
    """PiSSA, OLoRA and LoRA-GA leave W - A0 B0 in the base: with the adapter switched off that is not the model DPO
    starts from, so the reference would be wrong; refused before anything loads."""
    from tunesmith.errors import FlagError
    from tunesmith.train.config import check
    from tunesmith.train.recipe import method_for

    for init in ("pissa", "olora", "lora-ga"):
        args = parse_args("rlhf", ["--rlhf_type", "dpo", "--model", tiny_models("qwen2"), "--dataset",
                                   str(tmp_path / "x.jsonl"), "--init_weights", init])
        with pytest.raises(FlagError, match=f"--init_weights {init} moves part of every targeted weight"):
            check(args, method_for(args))


def test_lora_flags_another_tuner_does_not_read_are_said(capsys):
    """ms-swift accepts them and ignores them; tunesmith says so (AdaLoRA reads --lora_alpha, --lora_dropout and
    --lora_bias, its rank is --adalora_init_r)."""
    from tunesmith.train.config import _combination_notes

    _combination_notes(parse_args("sft", ["--train_type", "vera", "--lora_rank", "16", "--lora_alpha", "8"]))
    _combination_notes(parse_args("sft", ["--train_type", "adalora", "--lora_rank", "16", "--lora_alpha", "8"]))
    err = capsys.readouterr().err
    assert "--train_type vera does not read LoRA's --lora_rank, --lora_alpha: they have no effect" in err
    assert "--train_type adalora does not read LoRA's --lora_rank: it has no effect" in err
