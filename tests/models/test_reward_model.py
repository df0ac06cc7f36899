"""Checkpoints given to the inference commands: a reward model (a LoRA adapter with a score head, or a full
*ForSequenceClassification model) is refused by infer, deploy, eval and export alike — before any model loads —
with what to do instead; they would load a causal LM, drop the trained score head and generate from the backbone."""
import json

import pytest

from conftest import write_jsonl


@pytest.fixture(scope="module")
def reward_models(tiny_models, tmp_path_factory):
    """(a SEQ_CLS LoRA adapter with an args.json naming its base, as `rlhf --rlhf_type rm` saves it; a full reward
    model folder, as --train_type full saves it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = tiny_models("qwen2")
    rm = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    full = tmp_path_factory.mktemp("rm-full")
    rm.save_pretrained(full)
    adapter = tmp_path_factory.mktemp("rm-lora")
    get_peft_model(rm, LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS")).save_pretrained(adapter)
    for folder in (adapter, full):
        (folder / "args.json").write_text(json.dumps({"model": base, "rlhf_type": "rm"}))
    return str(adapter), str(full)


def _eval_flags(tmp_path):
    qa = tmp_path / "qa"
    qa.mkdir()
    write_jsonl(qa / "qa.jsonl", [{"query": "Capital of France?", "response": "Paris"}])
    return ["--eval_dataset", "general_qa", "--eval_dataset_args", json.dumps({"general_qa": {"local_path": str(qa)}}),
            "--eval_output_dir", str(tmp_path / "eval")]


@pytest.mark.parametrize("command,kind", [(c, k) for c in ("infer", "deploy", "eval") for k in ("lora", "full")]
                         + [("export", "lora")])
def test_a_reward_model_is_refused_by_every_inference_command(reward_models, tmp_path, capsys, command, kind):
    from tunesmith.cli import main

    adapter, full = reward_models
    flag, path = ("--adapters", adapter) if kind == "lora" else ("--model", full)
    extra = {"infer": [], "deploy": ["--port", "0"], "eval": _eval_flags(tmp_path),
             "export": ["--merge_lora", "true", "--output_dir", str(tmp_path / "merged")]}[command]
    rc = main([command, flag, path, *extra])
    err = capsys.readouterr().err
    assert rc == 1, err
    what = "a LoRA adapter with a score head: peft task SEQ_CLS, as --rlhf_type rm saves it" if kind == "lora" \
        else "its config.json names Qwen2ForSequenceClassification"
    assert f"error: {flag} {path} is a reward model ({what}): it scores replies and does not generate text" in err
    assert f"--reward_model {path}" in err and "AutoModelForSequenceClassification.from_pretrained" in err
    assert "Traceback" not in err and "generation:" not in err  # refused before the engine was built
    assert not (tmp_path / "merged").exists() and not (tmp_path / "eval").exists()


def test_a_reward_model_from_the_hub_is_refused_once_downloaded(reward_models):
    """A hub id is checked in the folder it was downloaded to, before the weights load."""
    from tunesmith.errors import ConfigError
    from tunesmith.models.load import refuse_reward_model

    with pytest.raises(ConfigError, match="--model org/reward-7b is a reward model .its config.json names "
                                          "Qwen2ForSequenceClassification"):
        refuse_reward_model("org/reward-7b", reward_models[1])
