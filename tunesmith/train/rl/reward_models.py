"""GRPO's and PPO's reward models as ms-swift configures them (arguments/rlhf_args.py RewardModelArguments,
pipelines/train/rlhf.py `_prepare_model_tokenizer`): --reward_model with the options that go with each one —
--reward_model_revision, --reward_model_type, --reward_template and GRPO's --reward_model_plugin, each a list
parallel to --reward_model — and --reward_adapters, merged into every reward model (ms-swift's rule).

`reward_model_specs` checks them with the other flag problems, before anything loads, into frozen
`RewardModelSpec`s (the file-only checks are reward_checks'); `load_reward_model` loads one: its folder resolved
like --model's (a local folder, or a hub id downloaded at its revision), a sequence classifier (a score head) or a
causal LM (generative plugins); a reward model that is itself a LoRA adapter is merged into its base, then the
--reward_adapters in order; its tokenizer with the chat template --reward_template names. --reward_model_type is
checked to be a model type (ms-swift refuses an unknown one); the architecture is read from the reward model's
config.json, as for the policy.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Optional

from tunesmith.errors import ConfigError
from tunesmith.log import note
from tunesmith.train.rl import reward_checks, rm_plugins
# imported for what it offers plugin files (ORM, orms): a file read here for its rm_plugins may register rewards too
from tunesmith.train.rl import rewards  # noqa: F401

# the options given once per reward model, in --reward_model's order
PER_MODEL = ("reward_model_revision", "reward_model_type", "reward_template", "reward_model_plugin")


@dataclass(frozen=True)
class RewardModelSpec:
    """One --reward_model and its options: path (a local folder or a hub id), revision (hub), declared_type
    (ms-swift's --reward_model_type: checked against the known names), template (an ms-swift template name: its
    official chat template renders the conversations; None: the reward model's own), plugin (default | genrm | a
    name registered in rm_plugins), adapters (LoRA adapter folders merged into it, in order); and where they come
    from: plugin_paths (the --external_plugins files that register plugins), use_hf and hub_token (where a hub id
    downloads from, as --model's; the token is kept out of the repr)."""
    path: str
    revision: Optional[str] = None
    declared_type: Optional[str] = None
    template: Optional[str] = None
    plugin: str = "default"
    adapters: tuple = ()
    plugin_paths: tuple = ()
    use_hf: bool = False
    hub_token: Optional[str] = field(default=None, repr=False)


def reward_model_specs(args, problems: list, plugins: bool = True) -> tuple:
    """The --reward_model list with its options, checked (each problem appended, so that they are reported with
    the other flag problems): every per-model option has one value per reward model; --reward_adapters have a
    reward model to go into; --reward_template names a template tunesmith carries; --reward_model_plugin names a
    registered plugin (plugins False: PPO, which takes the default only); --reward_model_type is a model type;
    each folder is a reward model its plugin can score with, its adapters there and trained on its shape. A
    revision given for a local folder is said to be ignored. Returns () when the counts are wrong."""
    paths = list(args.reward_model)
    given = {"reward_model_revision": args.reward_model_revision, "reward_model_type": args.reward_model_type,
             "reward_template": args.reward_template, "reward_model_plugin": args.reward_model_plugin}
    given = {k: list(v) for k, v in given.items() if v}
    wrong = [f"--{k} {len(v)}" for k, v in given.items() if len(v) != len(paths)]
    if wrong:
        problems.append(f"--reward_model has {len(paths)} value(s), but {', '.join(wrong)}: give one value of each "
                        f"per reward model, in --reward_model's order")
        return ()
    if args.reward_adapters and not paths:
        problems.append("--reward_adapters are merged into each --reward_model: give --reward_model (the model "
                        "they were trained on) too")
        return ()
    specs = tuple(RewardModelSpec(p, *(given[k][i] if k in given else None for k in PER_MODEL[:3]),
                                  plugin=given.get("reward_model_plugin", ["default"] * len(paths))[i],
                                  adapters=tuple(args.reward_adapters), plugin_paths=tuple(args.external_plugins),
                                  use_hf=args.use_hf, hub_token=args.hub_token) for i, p in enumerate(paths))
    for spec in specs:
        problems += spec_problems(spec, plugins)
        if spec.revision is not None and os.path.isdir(spec.path):
            note(f"--reward_model_revision {spec.revision}: --reward_model {spec.path} is a local folder, so the "
                 f"revision is ignored (it picks the snapshot of a hub id)")
    return specs


def spec_problems(spec: RewardModelSpec, plugins: bool = True) -> list:
    """What is wrong with one reward model and its options (`reward_model_specs`), one message each."""
    from tunesmith.data.tiny_tokenizer import official_template_names

    problems = []
    if spec.template is not None and spec.template.lower() not in official_template_names():
        problems.append(f"--reward_template {spec.template}: tunesmith carries no chat template of that name; use "
                        f"one of {', '.join(official_template_names())}, or leave it out (the reward model's own "
                        f"chat template)")
    if spec.declared_type is not None:
        problems += [p for p in [reward_checks.model_type_problem(spec.declared_type)] if p]
    if spec.plugin != "default" and not plugins:
        problems.append(f"--reward_model_plugin {spec.plugin}: PPO scores with the reward model's head (its "
                        f"copy is the value model), as ms-swift's PPO, which calls no reward-model plugin; "
                        f"drop the flag (GRPO takes it)")
    elif plugins and (spec.plugin != "default" or spec.plugin_paths):
        try:  # the plugin files run now: their registrations (an override of default too) are known up front
            rm_plugins.plugin_class(spec.plugin, list(spec.plugin_paths))
        except ConfigError as e:
            problems.append(str(e))
    adapters = reward_checks.adapter_problems(spec.adapters)
    if adapters:  # the reward model's kind depends on its adapters: judged once they are there
        return problems + adapters
    return problems + _path_problems(spec, plugins)


def _path_problems(spec: RewardModelSpec, plugins: bool = True) -> list:
    """A local folder holding a model or adapter whose kind fits the plugin, its --reward_adapters trained on a
    model of its shape, or a hub id (org/name: checked once downloaded). plugins False (PPO): no fix that needs a
    reward-model plugin is suggested."""
    path = spec.path
    if not os.path.isdir(path):
        problem = reward_checks.missing_path_problem(path)
        return [problem] if problem else []
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "adapter_config.json")):
        return [f"--reward_model {path}: no config.json or adapter_config.json in it, so it is not a model "
                f"checkpoint (pass a checkpoint-N folder of a --rlhf_type rm run)"]
    unfit = [p for p in (reward_checks.adapter_fit_problem(a, path) for a in spec.adapters) if p]
    if unfit:
        return unfit
    kind, why = folder_kind(path, spec.adapters)
    if spec.plugin == "default" and kind == "causal_lm":
        return [_not_a_reward_model(spec, why, plugins)]
    if spec.plugin == "genrm" and kind == "seq_cls":
        return [f"--reward_model {path}: --reward_model_plugin genrm has the model write its judgement, but this "
                f"one is a sequence classifier ({why}); give it a causal language model, or score this one with "
                f"the default plugin"]
    return []


def _not_a_reward_model(spec: RewardModelSpec, why: str, plugins: bool) -> str:
    """The refusal of a causal LM scored by its (untrained) head: what the --reward_adapters are, when they are
    what makes it so; a fix that works for the command (genrm: GRPO only)."""
    genrm = ", or judge with a language model: --reward_model_plugin genrm" if plugins else ""
    if spec.adapters:
        tasks = [(a, reward_checks.read_json(os.path.join(a, "adapter_config.json")).get("task_type"))
                 for a in spec.adapters]
        shown = "; ".join(f"{a}'s task_type is {t}" for a, t in tasks)
        return (f"--reward_adapters: {shown}, not SEQ_CLS (a reward model's, as --rlhf_type rm saves it with "
                f"LoRA), so --reward_model {spec.path} would score with an untrained head and the rewards would be "
                f"random; pass the adapter of a --rlhf_type rm run{genrm}")
    return (f"--reward_model {spec.path}: not a reward model ({why}), so its score head would be untrained and the "
            f"rewards random; train one with --rlhf_type rm and pass its checkpoint (or its LoRA adapter with "
            f"--reward_adapters){genrm}")


def adapter_scores(adapter: str) -> bool:
    """Whether a LoRA adapter folder carries a trained score head: trained for sequence classification (peft
    task_type SEQ_CLS saves the head), or with `score` among its modules_to_save."""
    config = reward_checks.read_json(os.path.join(adapter, "adapter_config.json"))
    return config.get("task_type") == "SEQ_CLS" or "score" in (config.get("modules_to_save") or [])


def folder_kind(path: str, adapters: tuple = ()) -> tuple:
    """(kind, why) of a local reward-model folder by ms-swift's rule (pipelines/train/rlhf.py
    `_get_model_task_type`): "seq_cls" when it scores with a head — its config.json names a
    *ForSequenceClassification architecture, it is a SEQ_CLS adapter, or one of `adapters` carries a score head —,
    "causal_lm" when it is a language model without one, None when it cannot be told (no readable config); why
    names the file and value that decided."""
    if any(adapter_scores(a) for a in adapters):
        return "seq_cls", "--reward_adapters carry a score head"
    adapter = reward_checks.read_json(os.path.join(path, "adapter_config.json"))
    if adapter and not os.path.isfile(os.path.join(path, "config.json")):
        task = adapter.get("task_type")
        return ("seq_cls" if task == "SEQ_CLS" else "causal_lm"), f"adapter_config.json has task_type {task}"
    config = reward_checks.read_json(os.path.join(path, "config.json"))
    if "architectures" not in config:
        return None, "no architectures in config.json"
    archs = config.get("architectures")
    seq_cls = any(str(a).endswith("ForSequenceClassification") for a in archs or [])
    return ("seq_cls" if seq_cls else "causal_lm"), f"config.json has architectures {archs}"


def scorer_config(path: str):
    """(the transformers config of the model a reward-model folder holds, the folder it was read from): the
    folder's own config.json, or for a LoRA adapter its base model's (adapter_config.json)."""
    from transformers import AutoConfig

    adapter = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(adapter):
        base = reward_checks.read_json(adapter).get("base_model_name_or_path") or path
        return AutoConfig.from_pretrained(base), base
    return AutoConfig.from_pretrained(path), path


def scorer_class(config):
    """AutoModelForSequenceClassification, or a supported vision-language family's own (models/vision.py)."""
    from transformers import AutoModelForSequenceClassification

    from tunesmith.models.vision import is_vision_language, sequence_classifier

    return sequence_classifier(config) if is_vision_language(config) else AutoModelForSequenceClassification


def resolve_folder(spec: RewardModelSpec) -> str:
    """The reward model's local folder: its path, or its hub id downloaded at --reward_model_revision (ModelScope,
    or Hugging Face with --use_hf), as --model is. Raises ConfigError when neither works."""
    from tunesmith.models.load import resolve_model_dir

    try:
        return resolve_model_dir(spec.path, spec.use_hf, spec.revision, spec.hub_token)
    except ConfigError as e:
        raise ConfigError(str(e).replace("--model ", "--reward_model ", 1)) from None


def adapter_chain(spec: RewardModelSpec, folder: str) -> list:
    """The LoRA adapters merged into the reward model, in order: the resolved folder itself when it is an adapter
    (merged into its base first), then the --reward_adapters."""
    own = os.path.isfile(os.path.join(folder, "adapter_config.json")) and \
        not os.path.isfile(os.path.join(folder, "config.json"))
    return ([folder] if own else []) + list(spec.adapters)


def load_reward_model(spec: RewardModelSpec, folder: str, head: str) -> tuple:
    """(model in eval mode, tokenizer, transformers config, loading info) of a resolved reward-model folder: a
    sequence classifier with one output (head "seq_cls") or a causal LM ("causal_lm"); a folder that is a LoRA
    adapter loaded onto its base and merged, then the --reward_adapters merged in order (peft; a SEQ_CLS adapter
    brings its trained score head); the tokenizer with a pad token (the model's config knows it: the classifier
    reads each row's last real token) and --reward_template's chat template. Raises ConfigError for an adapter
    trained on a model of another shape; OSError / ValueError / RuntimeError from transformers or peft (the caller
    words them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.data.tiny_tokenizer import official_template_for
    from tunesmith.models.load import without_load_report

    for adapter in spec.adapters:  # a hub id's shapes are known once it is downloaded
        problem = reward_checks.adapter_fit_problem(adapter, folder, shown=spec.path)
        if problem:
            raise ConfigError(problem)
    config, base = scorer_config(folder)
    own = any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    tok = AutoTokenizer.from_pretrained(folder if own else base)  # an adapter saved without one: its base's
    if spec.template is not None:
        tok.chat_template = official_template_for(spec.template)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    with without_load_report():  # a LoRA reward model's base, before its adapter, has no score yet
        if head == "seq_cls":
            model, info = scorer_class(config).from_pretrained(base, num_labels=1, output_loading_info=True)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(base, output_loading_info=True)
    model = _merged(model, adapter_chain(spec, folder), spec)
    model.config.pad_token_id = model.config.get_text_config().pad_token_id = tok.pad_token_id
    model.eval()
    model.requires_grad_(False)
    return model, tok, config, info


def _merged(model, chain: list, spec: RewardModelSpec):
    """`model` with each LoRA adapter of `chain` loaded (peft) and merged into it, in order. Raises ConfigError,
    in one line, for an adapter whose weights have other shapes than the model's (trained on another model)."""
    if not chain:
        return model
    from peft import PeftModel

    for adapter in chain:
        try:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        except RuntimeError as e:
            if "size mismatch" not in str(e):
                raise
            base = reward_checks.read_json(os.path.join(adapter, "adapter_config.json")).get(
                "base_model_name_or_path") or "another model"
            flag = "--reward_adapters" if adapter in spec.adapters else "--reward_model"
            raise ConfigError(f"{flag} {adapter}: its weights do not fit the reward model {spec.path} (it was "
                              f"trained on {base}, of another shape): pass the model it was trained on as "
                              f"--reward_model, or an adapter trained on this one") from None
    return model


def plugin_reward(spec: RewardModelSpec):
    """A --reward_model_plugin other than ms-swift's default (or a plugin file's override of `default`) as a
    reward function: the reward model loaded as its folder's kind says (a score head: a sequence classifier; else a
    causal LM — genrm's judge), the plugin class built over it and a RewardTemplate, wrapped as
    rm_plugins.PluginReward. Raises ConfigError when the model cannot be loaded or the plugin's constructor fails."""
    cls = rm_plugins.plugin_class(spec.plugin, list(spec.plugin_paths))
    folder = resolve_folder(spec)
    problems = _path_problems(replace(spec, path=folder))  # a hub id's kind is known once downloaded
    if problems:
        raise ConfigError(problems[0])
    kind, _ = folder_kind(folder, spec.adapters)
    head = "causal_lm" if spec.plugin == "genrm" else (kind or "causal_lm")
    try:
        model, tok, _, _ = load_reward_model(spec, folder, head)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"--reward_model {spec.path}: cannot load it for --reward_model_plugin {spec.plugin} "
                          f"({e})") from None
    template = rm_plugins.RewardTemplate(tok, head, model)
    return rm_plugins.PluginReward(spec.plugin, rm_plugins.build_plugin(spec.plugin, cls, model, template),
                                   spec.path)


def overrides_default(spec: RewardModelSpec) -> bool:
    """Whether --reward_model_plugin default names a plugin file's class (`rm_plugins['default'] = Cls` in an
    --external_plugins file): ms-swift reads the registry after importing the plugins, so the override wins."""
    if spec.plugin != "default" or not spec.plugin_paths:
        return False
    return rm_plugins.plugin_class("default", list(spec.plugin_paths)) is not rm_plugins.DefaultRMPlugin
