"""GRPO's and PPO's --reward_model options, as ms-swift's: --reward_model_revision (the hub revision the reward
model is downloaded at), --reward_model_type (one per reward model), --reward_adapters (LoRA adapters merged into
each reward model), --reward_template (the chat template each renders with) and --reward_model_plugin (ms-swift's
rm_plugins: default, genrm, or a plugin file's own class, run without ms-swift installed)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import read_jsonl, write_jsonl
from tunesmith.config.parser import parse_args
from tunesmith.errors import ConfigError
from tunesmith.train import recipe

needs_no_swift = pytest.mark.skipif(importlib.util.find_spec("swift") is not None,
                                    reason="tests tunesmith's stand-in for a missing ms-swift")
CONVERSATIONS = [[{"role": "user", "content": "is the sky blue?"}, {"role": "assistant", "content": "yes it is"}],
                 [{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "green, and red"}]]


def _classifier(tiny_models, folder, seed=0) -> str:
    """A full sequence-classification reward model (random score head, seeded) on the tiny qwen2 model."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = tiny_models("qwen2")
    torch.manual_seed(seed)
    rm = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    rm.config.pad_token_id = AutoTokenizer.from_pretrained(base).pad_token_id
    rm.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return str(folder)


def _scores(model, tok, texts) -> list:
    """An independent reference: each rendered text scored alone by a sequence classifier."""
    import torch

    with torch.no_grad():
        return [float(model(**tok(t, return_tensors="pt", add_special_tokens=False)).logits[0, 0]) for t in texts]


@pytest.fixture(scope="module")
def adapter(tiny_models, tmp_path_factory):
    """A SEQ_CLS LoRA adapter on the tiny qwen2 model (what --rlhf_type rm saves with LoRA): its LoRA weights and
    score head set to seeded random values, so that it changes every score."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models("qwen2"), num_labels=1)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "score" in name:
                p.normal_(0, 0.5)
    folder = str(tmp_path_factory.mktemp("rm-adapter"))
    model.save_pretrained(folder)
    return folder


def test_reward_adapters_score_as_the_peft_loaded_model(tiny_models, adapter):
    """--reward_model BASE --reward_adapters ADAPTER scores each conversation as transformers + peft do with the
    adapter loaded on BASE (1e-5); without the adapter BASE has no trained score head and is refused."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunesmith.train.methods.rm import RewardModelScorer
    from tunesmith.train.rl.reward_models import RewardModelSpec

    base = tiny_models("qwen2")
    scorer = RewardModelScorer(base, spec=RewardModelSpec(base, adapters=(adapter,)))
    got = scorer(["yes it is", "green, and red"], messages=CONVERSATIONS)
    tok = AutoTokenizer.from_pretrained(base)
    ref = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    ref.config.pad_token_id = tok.pad_token_id
    ref = PeftModel.from_pretrained(ref, adapter).eval()
    want = _scores(ref, tok, [tok.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS])
    assert got == pytest.approx(want, abs=1e-5) and abs(want[0] - want[1]) > 1e-3
    with pytest.raises(ConfigError, match="has no trained score head"):
        RewardModelScorer(base)


def test_reward_template_renders_with_the_named_template(tiny_models, tmp_path):
    """--reward_template qwen3: the conversations are rendered with Qwen3's official chat template (not the reward
    model's own), and scored as that rendering is."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunesmith.data.tiny_tokenizer import official_template_for
    from tunesmith.train.methods.rm import RewardModelScorer
    from tunesmith.train.rl.reward_models import RewardModelSpec

    rm = _classifier(tiny_models, tmp_path / "rm")
    own = RewardModelScorer(rm)([c[-1]["content"] for c in CONVERSATIONS], messages=CONVERSATIONS)
    named = RewardModelScorer(rm, spec=RewardModelSpec(rm, template="qwen3"))
    got = named([c[-1]["content"] for c in CONVERSATIONS], messages=CONVERSATIONS)
    tok = AutoTokenizer.from_pretrained(rm)
    texts = [tok.apply_chat_template(c, tokenize=False, chat_template=official_template_for("qwen3"))
             for c in CONVERSATIONS]
    assert "<think>" in texts[0]  # Qwen3's template, not the tiny model's own
    want = _scores(AutoModelForSequenceClassification.from_pretrained(rm).eval(), tok, texts)
    assert got == pytest.approx(want, abs=1e-5) and got != pytest.approx(own, abs=1e-4)


def test_reward_model_revision_picks_the_hub_snapshot(tiny_models, tmp_path):
    """A hub id is downloaded at --reward_model_revision (here from a Hugging Face cache, offline): revision v1 and
    v2 are two different reward models, and each scores as its own snapshot."""
    snapshots = {}
    repo = tmp_path / "hub" / "models--org--rm"
    for seed, rev in enumerate(("v1", "v2")):
        sha = f"{seed + 1}" * 40
        snapshots[rev] = _classifier(tiny_models, repo / "snapshots" / sha, seed=seed)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / rev).write_text(sha)
    code = ("import json, sys; from tunesmith.train.methods.rm import RewardModelScorer; "
            "from tunesmith.train.rl.reward_models import RewardModelSpec as S; "
            "c = json.loads(sys.argv[1]); "
            "print(json.dumps([RewardModelScorer('org/rm', spec=S('org/rm', revision=r, use_hf=True))"
            "(['x', 'y'], messages=c) for r in ('v1', 'v2')]))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(CONVERSATIONS)], capture_output=True, text=True,
                         env=env, cwd=os.getcwd())
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    from tunesmith.train.methods.rm import RewardModelScorer
    for rev, scores in zip(("v1", "v2"), got):
        assert scores == pytest.approx(RewardModelScorer(snapshots[rev])(["x", "y"], messages=CONVERSATIONS),
                                       abs=1e-5)
    assert got[0] != pytest.approx(got[1], abs=1e-4)


PLUGIN_3X = '''
from copy import deepcopy

import torch

from swift.llm import PtEngine, RequestConfig, Template, to_device
from swift.plugin import rm_plugins


class CustomizedRMPlugin:
    """ms-swift 3.x's example plugin (examples/train/grpo/plugin/plugin.py), unchanged."""

    def __init__(self, model, template):
        self.model = model
        self.template: Template = template

    def __call__(self, inputs):
        batched_inputs = [self.template.encode(deepcopy(infer_request)) for infer_request in inputs]
        reward_inputs = to_device(self.template.data_collator(batched_inputs), self.model.device)
        reward_inputs.pop('labels')

        with torch.inference_mode():
            return self.model(**reward_inputs).logits[:, 0]


rm_plugins['my_rmplugin'] = CustomizedRMPlugin
'''

PLUGIN_4X = '''
from swift.rewards import rm_plugins
from swift.rewards.rm_plugin import DefaultRMPlugin


class TokenCount(DefaultRMPlugin):
    """Rewards each conversation with its token count under the reward model's template, and the completion's
    length in characters: what __call__ computes is the reward."""

    def __call__(self, inputs, **kwargs):
        assert "trainer_state" in kwargs and all("solution" in row for row in inputs)
        return [len(self.template.encode(row)["input_ids"]) / 100 + len(row["messages"][-1]["content"])
                for row in inputs]


rm_plugins["token_count"] = TokenCount
'''


@needs_no_swift
def test_a_3x_plugin_file_runs_unchanged_and_equals_the_score_head(tiny_models, tmp_path):
    """ms-swift 3.x's CustomizedRMPlugin (template.encode, data_collator, to_device, pop('labels')), loaded without
    ms-swift installed, gives the same rewards as the default plugin (the reward model's head)."""
    from tunesmith.train.methods.rm import reward_model_functions
    from tunesmith.train.rl.reward_models import RewardModelSpec

    rm = _classifier(tiny_models, tmp_path / "rm")
    plugin = tmp_path / "rm_plugin_3x.py"
    plugin.write_text(PLUGIN_3X)
    completions = [c[-1]["content"] for c in CONVERSATIONS]
    default, = reward_model_functions([RewardModelSpec(rm)])
    custom, = reward_model_functions([RewardModelSpec(rm, plugin="my_rmplugin", plugin_paths=(str(plugin),))])
    want = default(completions, messages=CONVERSATIONS)
    assert custom(completions, messages=CONVERSATIONS, trainer_state=None) == pytest.approx(want, abs=1e-5)


def _judge(tiny_models, folder) -> str:
    """A tiny causal LM that, greedily, answers any prompt with "Reward: 0.5" and stops: every layer's output
    projection is zero (the residual stream is the token's embedding) and the embedding and output rows of the
    reply's tokens chain each token to the next."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_models("qwen2")
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, tie_word_embeddings=False)
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    prompt = tok.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False, add_generation_prompt=True)
    chain = [tok(prompt, add_special_tokens=False)["input_ids"][-1]] + \
        tok("Reward: 0.5", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert len(set(chain)) == len(chain), chain
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[chain] = 0
        model.lm_head.weight.zero_()
        for j, (t, nxt) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[t, j] = 1.0
            model.lm_head.weight[nxt, j] = 100.0
    model.config.tie_word_embeddings = False
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_genrm_parses_the_judges_scores(tiny_models, tmp_path):
    """--reward_model_plugin genrm (ms-swift's GenRMPlugin) on a tiny causal LM that writes "Reward: 0.5": each
    completion's reward is the parsed score; the parsing and the averaging over choices are ms-swift's."""
    from tunesmith.train.methods.rm import reward_model_functions
    from tunesmith.train.rl.reward_models import RewardModelSpec
    from tunesmith.train.rl.rm_plugins import GenRMPlugin

    judge = _judge(tiny_models, tmp_path / "judge")
    fn, = reward_model_functions([RewardModelSpec(judge, plugin="genrm")])
    assert fn([c[-1]["content"] for c in CONVERSATIONS], messages=CONVERSATIONS) == [0.5, 0.5]
    assert GenRMPlugin.extract_reward("so. Reward: 0.85") == 0.85
    assert GenRMPlugin.extract_reward("Reward: 1.2.3") is None  # not a prefix of a longer number
    assert GenRMPlugin.messages_to_query(CONVERSATIONS[0]) == "User: is the sky blue?\nAssistant: yes it is"


@needs_no_swift
def test_grpo_trains_with_a_4x_plugin_file(tiny_models, tmp_path):
    """A GRPO run with --reward_model_plugin naming a class an ms-swift 4.x plugin file registers: every rollout's
    reward_model reward is what the plugin's __call__ computes for it."""
    from transformers import AutoTokenizer

    from tunesmith.data.encode import ChatEncoder

    rm = _classifier(tiny_models, tmp_path / "rm")
    plugin = tmp_path / "rm_plugin_4x.py"
    plugin.write_text(PLUGIN_4X)
    data = write_jsonl(tmp_path / "prompts.jsonl", [
        {"messages": [{"role": "user", "content": f"say something {i}"}], "solution": "x"} for i in range(4)])
    res = recipe.main(parse_args("rlhf", [
        "--rlhf_type", "grpo", "--model", tiny_models("qwen2"), "--dataset", data, "--reward_model", rm,
        "--reward_model_plugin", "token_count", "--external_plugins", str(plugin), "--num_generations", "4",
        "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--max_completion_length", "6",
        "--max_steps", "2", "--logging_steps", "1", "--log_completions", "true", "--save_strategy", "no",
        "--report_to", "none", "--output_dir", str(tmp_path / "out")]))
    rollouts = read_jsonl(os.path.join(res["run_dir"], "completions.jsonl"))
    encoder = ChatEncoder(AutoTokenizer.from_pretrained(rm))
    assert len(rollouts) == 16
    for r in rollouts:
        messages = r["prompt"] + [{"role": "assistant", "content": r["completion"]}]
        want = len(encoder.encode({"messages": messages}, truncate=False).input_ids) / 100 + len(r["completion"])
        assert r["rewards"]["reward_model"] == pytest.approx(want, abs=1e-6)
    assert len([x for x in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "reward" in x]) == 2


@pytest.mark.parametrize("flags,message", [
    (["--reward_model", "RM", "RM", "--reward_model_revision", "main", "--reward_template", "qwen3", "qwen3", "qwen3"],
     r"--reward_model has 2 value\(s\), but --reward_model_revision 1, --reward_template 3: give one value of each"),
    (["--reward_model", "RM", "--reward_model_type", "qwen2", "qwen2"], "--reward_model_type 2"),
    (["--reward_model", "RM", "--reward_model_plugin", "default", "genrm"], "--reward_model_plugin 2"),
    (["--reward_funcs", "format", "--reward_adapters", "ADAPTER"], "give --reward_model .* too"),
    (["--reward_model", "RM", "--reward_template", "mistral"], "--reward_template mistral: .*one of .*qwen3"),
    (["--reward_model", "RM", "--reward_model_plugin", "genrn"], "no such reward-model plugin; did you mean genrm"),
    (["--reward_model", "RM", "--reward_model_plugin", "genrm"], "genrm has the model write .* sequence classifier"),
    (["--reward_model", "MODEL"], r"not a reward model \(config.json has architectures"),
    (["--reward_model", "MODEL", "--reward_adapters", "MODEL"], "--reward_adapters .*: no adapter_config.json"),
    (["--reward_model", "./missing"], "not a local checkpoint directory .*, nor a hub id"),
])
def test_bad_reward_model_options_are_flag_errors(tiny_models, tmp_path, adapter, flags, message):
    rm = _classifier(tiny_models, tmp_path / "rm")
    subs = {"RM": rm, "MODEL": tiny_models("qwen2"), "ADAPTER": adapter}
    args = parse_args("rlhf", ["--rlhf_type", "grpo", "--model", tiny_models("qwen2"), "--dataset", "x.jsonl",
                               *[subs.get(f, f) for f in flags]])
    with pytest.raises(ConfigError, match=message):
        recipe.configure(args)


def test_options_that_fit_are_accepted_and_ppo_refuses_plugins(tiny_models, tmp_path, adapter):
    """One value per reward model of every option is accepted (the base model with a SEQ_CLS adapter is a reward
    model; --reward_model_type is counted); PPO takes no reward-model plugin, as ms-swift's PPO calls none."""
    base = tiny_models("qwen2")
    args = parse_args("rlhf", ["--rlhf_type", "grpo", "--model", base, "--dataset", "x.jsonl", "--reward_model", base,
                               "--reward_adapters", adapter, "--reward_model_type", "qwen2_5", "--reward_template",
                               "qwen2_5", "--reward_model_revision", "master", "--reward_model_plugin", "default",
                               "--use_hf", "true", "--hub_token", "hf_secret"])
    _, method = recipe.configure(args)
    spec, = method.reward_models
    assert (spec.path, spec.adapters, spec.template, spec.revision, spec.declared_type, spec.use_hf) == \
        (base, (adapter,), "qwen2_5", "master", "qwen2_5", True)
    assert spec.hub_token == "hf_secret" and "hf_secret" not in repr(method)  # the token never shows
    rm = _classifier(tiny_models, tmp_path / "rm")
    args = parse_args("rlhf", ["--rlhf_type", "ppo", "--model", base, "--dataset", "x.jsonl", "--reward_model", rm,
                               "--reward_model_plugin", "genrm"])
    with pytest.raises(ConfigError, match="PPO scores with the reward model's head"):
        recipe.configure(args)


@needs_no_swift
def test_the_documented_plugin_runs_as_written(tiny_models, tmp_path):
    """docs/grpo.md's reward-model plugin example, written to a file as it stands: its rewards are the score head's
    minus 0.01 per character of the completion."""
    import re

    from tunesmith.train.methods.rm import reward_model_functions
    from tunesmith.train.rl.reward_models import RewardModelSpec

    doc = open(os.path.join(os.path.dirname(__file__), "..", "..", "..", "docs", "grpo.md"), encoding="utf-8").read()
    code = next(b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "length_judge" in b)
    plugin = tmp_path / "rm_plugin.py"
    plugin.write_text(code)
    rm = _classifier(tiny_models, tmp_path / "rm")
    completions = [c[-1]["content"] for c in CONVERSATIONS]
    head, = reward_model_functions([RewardModelSpec(rm)])
    judge, = reward_model_functions([RewardModelSpec(rm, plugin="length_judge", plugin_paths=(str(plugin),))])
    want = [s - 0.01 * len(c) for s, c in zip(head(completions, messages=CONVERSATIONS), completions)]
    assert judge(completions, messages=CONVERSATIONS, trainer_state=None) == pytest.approx(want, abs=1e-5)


def test_ppo_continues_the_reward_adapter_as_its_value_model(tiny_models, tmp_path, adapter):
    """PPO with --reward_model BASE --reward_adapters ADAPTER: the value model is the base with that adapter
    continued (LoRA), as with the adapter passed as --reward_model; more than one adapter is refused."""
    import torch
    from transformers import AutoTokenizer

    from tunesmith.config.slices import ModelConfig, take
    from tunesmith.train.rl.ppo_value import build_value_model
    from tunesmith.train.rl.reward_models import RewardModelSpec

    base = tiny_models("qwen2")
    argv = ["--rlhf_type", "ppo", "--model", base, "--dataset", "x.jsonl", "--reward_model", base,
            "--train_type", "lora", "--output_dir", str(tmp_path / "o")]
    cfg, method = recipe.configure(parse_args("rlhf", argv + ["--reward_adapters", adapter]))
    spec, = method.reward_models
    value = build_value_model(take(ModelConfig, cfg.args), spec, AutoTokenizer.from_pretrained(base), cfg.optim,
                              torch.device("cpu"))
    assert f"its LoRA adapter {adapter} continued" in value.describe and hasattr(value.model, "peft_config")
    with pytest.raises(ConfigError, match="--reward_adapters: PPO's value model continues"):
        recipe.configure(parse_args("rlhf", argv + ["--reward_adapters", adapter, adapter]))
    assert isinstance(spec, RewardModelSpec)


def test_the_template_offers_what_plugins_use_and_names_the_rest(tiny_models):
    """RewardTemplate: encode gives labels only for a causal LM, data_collator pads on the right (labels None for a
    classifier), and a part of ms-swift's Template it does not have is an AttributeError naming what it offers."""
    from transformers import AutoTokenizer

    from tunesmith.train.rl.rm_plugins import RewardTemplate

    tok = AutoTokenizer.from_pretrained(tiny_models("qwen2"))
    lm, cls = RewardTemplate(tok, "causal_lm"), RewardTemplate(tok, "seq_cls")
    rows = [lm.encode({"messages": c}) for c in CONVERSATIONS]
    assert all(len(r["labels"]) == len(r["input_ids"]) for r in rows) and "labels" not in cls.encode(CONVERSATIONS[0])
    assert any(x != -100 for x in rows[0]["labels"])  # the assistant reply is labelled
    batch = lm.data_collator(rows)
    n = len(rows[0]["input_ids"])
    assert batch["input_ids"][0, :n].tolist() == rows[0]["input_ids"] and batch["attention_mask"][0].sum() == n
    assert cls.data_collator([cls.encode(CONVERSATIONS[0])])["labels"] is None
    with pytest.raises(AttributeError, match="template.set_loss_scale: .*offers ms-swift's encode, data_collator"):
        lm.set_loss_scale("default")
    with pytest.raises(NotImplementedError, match="TemplateInputs"):
        lm.encode({"messages": CONVERSATIONS[0]}, return_template_inputs=True)
