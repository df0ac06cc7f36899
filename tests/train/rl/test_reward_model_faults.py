"""GRPO's and PPO's reward-model options used the wrong way, or in ways a first run finds: each is scored as
documented (an adapter --reward_model and --reward_adapters merged in order; a plugin file's own `default`; each
plugin on its own copy of the rows) or refused in one line naming the flag and a fix that works for the command
(an adapter of another model, a CAUSAL_LM adapter, a missing path, an unknown model type, a plugin's wrong return,
a reward of ±inf, an unreachable hub id)."""
import gc
import importlib.util
import json
import logging
import os
import subprocess
import sys
import warnings

import pytest

from tunesmith.config.parser import parse_args
from tunesmith.errors import ConfigError
from tunesmith.train import recipe

needs_no_swift = pytest.mark.skipif(importlib.util.find_spec("swift") is not None,
                                    reason="tests tunesmith's stand-in for a missing ms-swift")
CONVERSATIONS = [[{"role": "user", "content": "is the sky blue?"}, {"role": "assistant", "content": "yes it is"}],
                 [{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "green, and red"}]]
COMPLETIONS = [c[-1]["content"] for c in CONVERSATIONS]


def _adapter(base, folder, seed, task="SEQ_CLS") -> str:
    """A LoRA adapter on `base` (SEQ_CLS: a --rlhf_type rm one with its score head; CAUSAL_LM: an SFT one), its
    weights seeded random so that it changes every score; the tokenizer saved beside it, as a checkpoint is."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    if task == "SEQ_CLS":
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    else:
        model = AutoModelForCausalLM.from_pretrained(base)
    model = get_peft_model(model, LoraConfig(task_type=task, r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "score" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(base).save_pretrained(str(folder))
    return str(folder)


def _classifier(base, folder) -> str:
    """A full sequence-classification reward model on `base` (seeded random score head)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    rm.config.pad_token_id = AutoTokenizer.from_pretrained(base).pad_token_id
    rm.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(base).save_pretrained(str(folder))
    return str(folder)


def _configure(kind, base, *flags, tmp_path):
    """recipe.configure of a GRPO or PPO run on `base` with the reward flags."""
    return recipe.configure(parse_args("rlhf", ["--rlhf_type", kind, "--model", base, "--dataset", "x.jsonl",
                                                "--train_type", "lora", "--output_dir", str(tmp_path / "o"),
                                                *flags]))


def _refusal(kind, base, *flags, tmp_path) -> str:
    with pytest.raises(ConfigError) as e:
        _configure(kind, base, *flags, tmp_path=tmp_path)
    return str(e.value)


def test_an_adapter_reward_model_and_reward_adapters_merge_in_order(tiny_models, tmp_path):
    """--reward_model A2 (a LoRA adapter) --reward_adapters A1: A2 merged into its base, then A1 — the scores equal
    peft merging them in that order, and differ from either adapter alone. PPO, whose value model continues one
    adapter, refuses the pair in one line before anything loads."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunesmith.train.methods.rm import RewardModelScorer
    from tunesmith.train.rl.reward_models import RewardModelSpec

    base = tiny_models("qwen2")
    a1, a2 = _adapter(base, tmp_path / "a1", 1), _adapter(base, tmp_path / "a2", 2)
    got = RewardModelScorer(a2, spec=RewardModelSpec(a2, adapters=(a1,)))(COMPLETIONS, messages=CONVERSATIONS)
    tok = AutoTokenizer.from_pretrained(base)
    texts = [tok.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]

    def peft_scores(*adapters):
        """Each text scored alone by the base classifier with the adapters merged in order."""
        import torch

        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
        model.config.pad_token_id = tok.pad_token_id
        for a in adapters:
            model = PeftModel.from_pretrained(model, a).merge_and_unload()
        with torch.no_grad():
            return [float(model.eval()(**tok(t, return_tensors="pt", add_special_tokens=False)).logits[0, 0])
                    for t in texts]

    assert got == pytest.approx(peft_scores(a2, a1), abs=1e-5)
    assert got != pytest.approx(peft_scores(a1), abs=1e-3) and got != pytest.approx(peft_scores(a2), abs=1e-3)
    message = _refusal("ppo", base, "--reward_model", a2, "--reward_adapters", a1, tmp_path=tmp_path)
    assert f"--reward_model {a2} is a LoRA adapter, and --reward_adapters {a1} another" in message
    assert "\n" not in message and "GRPO merges both" in message


def test_an_adapter_of_another_model_is_refused_before_the_policy_loads(tiny_models, tmp_path):
    """--reward_adapters trained on a model of another shape: one line naming both models, from the flag checks
    (GRPO and PPO); when the base it names cannot be read, the loader says the same in one line."""
    import shutil

    from tunesmith.train.methods.rm import RewardModelScorer
    from tunesmith.train.rl.reward_models import RewardModelSpec

    base, other = tiny_models("qwen2"), tiny_models("qwen2", hidden=32)
    rmo = _adapter(other, tmp_path / "rmo", 3)
    for kind in ("grpo", "ppo"):
        message = _refusal(kind, base, "--reward_model", base, "--reward_adapters", rmo, tmp_path=tmp_path)
        assert message.startswith(f"--reward_adapters {rmo} was trained on {other}, not {base} (hidden_size 32 "
                                  f"there, 64 here)") and "\n" not in message
    moved = shutil.copytree(rmo, tmp_path / "moved")
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "gone/elsewhere"}))
    with pytest.raises(ConfigError, match=rf"--reward_adapters {moved}: its weights do not fit the reward model "
                                          rf"{base} \(it was trained on gone/elsewhere") as e:
        RewardModelScorer(base, spec=RewardModelSpec(base, adapters=(str(moved),)))
    assert "\n" not in str(e.value) and "size mismatch" not in str(e.value)


def test_a_causal_lm_adapter_is_named_for_its_task_type(tiny_models, tmp_path):
    """--reward_adapters SFT (a CAUSAL_LM adapter): its task_type is named, not SEQ_CLS; genrm is suggested for
    GRPO only (PPO refuses plugins), and no fix PPO refuses (merging with export, genrm) is suggested by PPO."""
    base = tiny_models("qwen2")
    sft = _adapter(base, tmp_path / "sft", 4, task="CAUSAL_LM")
    grpo = _refusal("grpo", base, "--reward_model", base, "--reward_adapters", sft, tmp_path=tmp_path)
    assert grpo.startswith(f"--reward_adapters: {sft}'s task_type is CAUSAL_LM, not SEQ_CLS") and "genrm" in grpo
    ppo = _refusal("ppo", base, "--reward_model", base, "--reward_adapters", sft, tmp_path=tmp_path)
    assert "task_type is CAUSAL_LM" in ppo and "genrm" not in ppo
    assert "genrm" not in _refusal("ppo", base, "--reward_model", base, tmp_path=tmp_path)
    rm = _adapter(base, tmp_path / "rm", 5)
    two = _refusal("ppo", base, "--reward_model", base, "--reward_adapters", rm, rm, tmp_path=tmp_path)
    assert "pass one" in two and "export" not in two


def test_paths_that_are_not_checkpoints_are_refused_up_front(tiny_models, tmp_path):
    """An existing file, a missing path that looks like one (checkpoint-N, a .py name, a/b/c) and a missing
    --reward_adapters folder are flag errors (one each), not hub downloads after the policy loaded."""
    base = tiny_models("qwen2")
    script = tmp_path / "plugin.py"
    script.write_text("x = 1\n")
    for path, message in ((str(script), "a file, not a checkpoint directory"),
                          ("out/checkpoint-100", "not a local checkpoint directory (no such folder"),
                          ("some/file.py", "not a local checkpoint directory"),
                          ("a/b/c", "not a local checkpoint directory")):
        got = _refusal("grpo", base, "--reward_model", path, tmp_path=tmp_path)
        assert got.startswith(f"--reward_model {path}: {message}"), got
    got = _refusal("grpo", base, "--reward_model", base, "--reward_adapters", "nope/ckpt", tmp_path=tmp_path)
    assert got.startswith("--reward_adapters nope/ckpt: no such directory") and "problems" not in got


def test_model_type_and_revision_are_checked(tiny_models, tmp_path, capsys):
    """--reward_model_type: an unknown type is refused with the near names, a known one (or one of a known
    family) accepted; --reward_model_revision on a local folder is said to be ignored."""
    base = tiny_models("qwen2")
    rm = _classifier(base, tmp_path / "rm")
    got = _refusal("grpo", base, "--reward_model", rm, "--reward_model_type", "totally_bogus", tmp_path=tmp_path)
    assert got.startswith("--reward_model_type totally_bogus: not a model type") and "qwen2_5" in got
    assert "did you mean" in _refusal("grpo", base, "--reward_model", rm, "--reward_model_type", "lamma3",
                                      tmp_path=tmp_path)
    for good in ("qwen2_5", "qwen2_5_math", "llama3_2"):
        _configure("grpo", base, "--reward_model", rm, "--reward_model_type", good, tmp_path=tmp_path)
    capsys.readouterr()
    _configure("grpo", base, "--reward_model", rm, "--reward_model_revision", "v9.9", tmp_path=tmp_path)
    assert f"--reward_model_revision v9.9: --reward_model {rm} is a local folder, so the revision is ignored" in \
        capsys.readouterr().err


def test_an_unreachable_hub_reward_model_names_its_flag_and_revision(tiny_models, tmp_path):
    """Offline, a hub id that is not cached: GRPO's reward model and PPO's value model (its copy) both name
    --reward_model and the revision asked for, not --model."""
    code = ("import json; from tunesmith.config.parser import parse_args; from tunesmith.config.slices import "
            "ModelConfig, take; from tunesmith.errors import ConfigError; from tunesmith.train import recipe; "
            "from tunesmith.train.rl.ppo_value import value_model_dir, value_source; "
            "from tunesmith.train.rl.reward_models import resolve_folder; out = []\n"
            "for kind in ('grpo', 'ppo'):\n"
            "    cfg, m = recipe.configure(parse_args('rlhf', ['--rlhf_type', kind, '--model', "
            f"{tiny_models('qwen2')!r}, '--dataset', 'x.jsonl', '--reward_model', 'org/rm-nowhere', "
            "'--reward_model_revision', 'v9', '--use_hf', 'true']))\n"
            "    try:\n"
            "        resolve_folder(m.reward_models[0]) if kind == 'grpo' else value_model_dir(value_source("
            "take(ModelConfig, cfg.args), m.reward_models[0])[0], m.reward_models[0])\n"
            "    except ConfigError as e:\n"
            "        out.append(str(e))\n"
            "print(json.dumps(out))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": os.getcwd()}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(got) == 2
    for message in got:
        assert message.startswith("--reward_model org/rm-nowhere: not a local directory, and downloading it at "
                                  "revision v9 from Hugging Face failed"), message


class _Plugin:
    """A reward-model plugin without a model: returns what it is told to."""

    def __init__(self, value):
        self.value = value

    def __call__(self, inputs, **kwargs):
        return self.value(inputs) if callable(self.value) else self.value


class _AsyncPlugin:
    async def __call__(self, inputs, **kwargs):
        return [1.0] * len(inputs)


def _score_plugin(plugin, n=2):
    """scoring.score of n completions with one reward-model plugin (on --reward_model RM)."""
    from tunesmith.train.rl.rm_plugins import PluginReward
    from tunesmith.train.rl.scoring import RewardFn, score

    fn = RewardFn("reward_model", "RM", PluginReward("judge", plugin, "RM"))
    return score([fn], ["a", "b", "c", "d"][:n], messages=[CONVERSATIONS[i % 2] for i in range(n)],
                 columns={"solution": ["x"] * n}, trainer_state={"global_step": 1})


@pytest.mark.parametrize("value, message", [
    ([1.0, float("inf")], r"--reward_model_plugin judge \(on --reward_model RM\) returned inf for completion 1 "
                          r"\('b'\): a reward must be finite"),
    (1.0, r"returned a float \(1.0\), expected one value per completion: a list of 2 numbers or None"),
    ({"rewards": [1.0, 2.0]}, r"returned a dict \(keys rewards\), expected one value per completion"),
    ("tensor21", r"returned a Tensor of shape \(2, 1\), expected shape \(2,\): one reward per completion"),
    ("tensor23", r"returned a Tensor of shape \(2, 3\), expected shape \(2,\)"),
    (lambda rows: rows[5], r"--reward_model_plugin judge \(on --reward_model RM\) raised IndexError: .* \(it was "
                           r"given inputs: 2 rows with messages, solution, and the keyword arguments messages, "
                           r"solution, trainer_state\)"),
])
def test_a_plugins_wrong_return_says_what_came_back(value, message):
    import torch

    value = {"tensor21": torch.zeros(2, 1), "tensor23": torch.zeros(2, 3)}.get(value, value) \
        if isinstance(value, str) else value
    with pytest.raises(ConfigError, match=message):
        _score_plugin(_Plugin(value))
    assert _score_plugin(_Plugin(torch.tensor([1.0, 2.0])))[0] == [[1.0], [2.0]]  # a 1-D tensor is the rewards


def test_an_async_plugin_is_refused_and_its_coroutine_closed(tmp_path):
    """An `async def __call__` plugin: refused when its class is looked up (before anything loads) and, called
    anyway, a one-line error — its coroutine closed, so Python never warns that it was not awaited."""
    from tunesmith.train.rl.rm_plugins import plugin_class

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ConfigError, match=r"returned a coroutine: its __call__ is async, but reward-model "
                                              r"plugins are called synchronously"):
            _score_plugin(_AsyncPlugin())
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]
    plugin = tmp_path / "async_rm.py"
    plugin.write_text("from swift.rewards import rm_plugins\n\nclass P:\n    def __init__(self, model, template):\n"
                      "        pass\n\n    async def __call__(self, inputs, **kwargs):\n        return [1.0]\n\n"
                      "rm_plugins['async_rm'] = P\n")
    if importlib.util.find_spec("swift") is None:
        with pytest.raises(ConfigError, match=r"--reward_model_plugin async_rm: P.__call__ is async"):
            plugin_class("async_rm", [str(plugin)])


def test_each_plugin_scores_its_own_copy_of_the_rows():
    """A plugin that changes its rows (and keyword arguments) changes nothing another reward sees: the caller's
    messages and columns are as they were, and a second reward gets them unchanged."""
    from tunesmith.train.rl.rm_plugins import PluginReward
    from tunesmith.train.rl.scoring import RewardFn, score

    def mutate(rows, **kwargs):
        for row in rows:
            row["messages"][-1]["content"] = "MUTATED"
            row["messages"].append({"role": "user", "content": "extra"})
            row["solution"] = "MUTATED"
        kwargs["messages"][0].append({"role": "user", "content": "extra"})
        return [0.0] * len(rows)

    class Mutating:
        def __call__(self, inputs, **kwargs):
            return mutate(inputs, **kwargs)

    seen = []

    def second(completions, messages, solution, **kwargs):
        seen.append((json.dumps(messages), list(solution)))
        return [1.0] * len(completions)

    messages = json.loads(json.dumps(CONVERSATIONS))
    fns = [RewardFn("reward_model", "RM", PluginReward("mutate", Mutating(), "RM")), RewardFn("second", "s", second)]
    score(fns, COMPLETIONS, messages=messages, columns={"solution": ["a", "b"]})
    assert messages == CONVERSATIONS and seen == [(json.dumps(CONVERSATIONS), ["a", "b"])]


@needs_no_swift
def test_a_plugin_files_default_replaces_the_score_head(tiny_models, tmp_path):
    """`rm_plugins['default'] = P` in an --external_plugins file: GRPO's default reward model scores with P, as
    ms-swift (which reads the registry after importing the plugins); PPO, which calls no plugin, with the head."""
    from tunesmith.train.methods.rm import RewardModelScorer, reward_model_functions
    from tunesmith.train.rl import rm_plugins
    from tunesmith.train.rl.reward_models import RewardModelSpec

    rm = _classifier(tiny_models("qwen2"), tmp_path / "rm")
    plugin = tmp_path / "override_default.py"
    plugin.write_text("from swift.rewards import rm_plugins\nfrom swift.rewards.rm_plugin import DefaultRMPlugin\n\n"
                      "class P(DefaultRMPlugin):\n    def __call__(self, inputs, **kwargs):\n"
                      "        return [42.0] * len(inputs)\n\nrm_plugins['default'] = P\n")
    spec = RewardModelSpec(rm, plugin_paths=(str(plugin),))
    try:
        grpo, = reward_model_functions([spec])
        ppo, = reward_model_functions([spec], plugins=False)
        assert grpo(COMPLETIONS, messages=CONVERSATIONS, trainer_state=None) == [42.0, 42.0]
        assert isinstance(ppo.fn, RewardModelScorer) and ppo(COMPLETIONS, messages=CONVERSATIONS) != [42.0, 42.0]
    finally:  # the registry is the process's, as ms-swift's: later tests get the built-in back
        rm_plugins.rm_plugins["default"] = rm_plugins.DefaultRMPlugin


@needs_no_swift
def test_a_missing_ms_swift_name_is_one_short_line(tmp_path):
    """A plugin importing a name of ms-swift's the stand-in lacks: the name, the nearest ones, a count and where
    they are documented — not every name there is."""
    from tunesmith.train.rl.rm_plugins import plugin_class

    plugin = tmp_path / "missing_name.py"
    plugin.write_text("from swift.rewards import rm_plugins\nfrom swift.llm import PtEngin\n")
    with pytest.raises(ConfigError) as e:
        plugin_class("anything", [str(plugin)])
    message = str(e.value)
    assert "imports PtEngin from swift.llm, which tunesmith does not provide" in message and "PtEngine" in message
    assert "docs/grpo.md" in message and len(message) < 500 and "\n" not in message


def test_genrm_warns_once_per_call(caplog):
    """genrm's judge writing no parseable score: one warning for the call, saying for how many completions."""
    from tunesmith.train.rl.rm_plugins import GenRMPlugin
    from tunesmith.train.rl.schedulers import (ChatCompletionResponse, ChatCompletionResponseChoice,
                                               ChatMessage)

    def response(text):
        return ChatCompletionResponse(model="judge", choices=[
            ChatCompletionResponseChoice(0, ChatMessage("assistant", text), "stop")])

    plugin = GenRMPlugin.__new__(GenRMPlugin)  # compute_rewards needs no model
    with caplog.at_level(logging.WARNING, logger="tunesmith.plugin"):
        got = plugin.compute_rewards([response("no score"), response("Reward: 0.5"), response("nothing")] * 4)
    assert got == [0.0, 0.5, 0.0] * 4
    warned = [r.getMessage() for r in caplog.records if r.name == "tunesmith.plugin"]
    assert warned == ["genrm: the judge wrote no parseable 'Reward: x' for 8 of 12 completions; each of them gets 0.0"]
