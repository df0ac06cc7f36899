"""ms-swift's reward-model plugins (`--reward_model_plugin NAME`, GRPO), run without ms-swift.

A plugin is a class registered as `rm_plugins['name'] = Cls` in an --external_plugins file (after `from
swift.rewards import rm_plugins`, ms-swift 4.x, or `from swift.plugin import rm_plugins`, 3.x), built once per
reward model as `Cls(model=..., template=...)` and called each round as `plugin(inputs=rows, **kwargs)`: `rows` are
ms-swift's reward rows (one dict per completion: `messages` — the conversation, completion last —, the dataset's
columns, `response_token_ids`, …), kwargs the reward functions' keyword arguments (`trainer_state`, the columns
batched); it returns one reward per completion (a list or a tensor; None: no reward). A plugin whose `__call__`
takes no **kwargs (ms-swift 3.x's `def __call__(self, inputs)`) gets `inputs` only. The built-ins are ms-swift 4.6's
(swift/rewards/rm_plugin.py): `default` (DefaultRMPlugin: the model's score head, logits[:, 0]) and `genrm`
(GenRMPlugin: the model as a judge, prompted to end its reply with "Reward: x"; x parsed and averaged over the
replies, 0.0 when none parses).

What a plugin is handed is tunesmith's, built on its own encoder and engine, offering exactly the parts of ms-swift's
objects that DefaultRMPlugin, GenRMPlugin and ms-swift's documented plugins (examples/train/grpo/plugin/plugin.py)
use: `RewardTemplate` — `encode`, `data_collator`, `tokenizer`/`processor`, `model`, `task_type` (any other
attribute is an AttributeError naming what there is); `TransformersEngine` (3.x: `PtEngine.from_model_template`) —
`infer(requests, request_config)` → ChatCompletionResponse per request, over tunesmith's ChatEngine; `to_device`;
ms-swift's `RequestConfig` and response classes (tunesmith.train.rl.schedulers). While a plugin file loads without
ms-swift installed they are importable from ms-swift's 4.x and 3.x homes (plugins.provide).
"""
from __future__ import annotations

import copy
import inspect
import logging
import math
import re
import textwrap
from typing import Optional

from tunesmith.errors import ConfigError
from tunesmith.train.rl import plugins
from tunesmith.train.rl.schedulers import (ChatCompletionResponse, ChatCompletionResponseChoice, ChatMessage,
                                           RequestConfig)

logger = logging.getLogger("tunesmith.plugin")


def to_device(inputs, device):
    """ms-swift's to_device: every tensor in `inputs` (nested dicts, lists, tuples) moved to `device`; other values
    kept as they are."""
    if isinstance(inputs, dict):
        return {k: to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(to_device(v, device) for v in inputs)
    if hasattr(inputs, "to") and hasattr(inputs, "device"):  # a tensor
        return inputs.to(device)
    return inputs


def _request_parts(request) -> tuple:
    """(messages, images, tools) of a request a plugin hands to template.encode or engine.infer: a dict with
    `messages` (a reward row; ms-swift's InferRequest as a dict), an object with a `messages` attribute
    (InferRequest, RolloutInferRequest) or a list of messages. Raises TypeError for anything else."""
    if isinstance(request, dict) and "messages" in request:
        return request["messages"], request.get("images"), request.get("tools")
    if isinstance(request, list):
        return request, None, None
    if hasattr(request, "messages"):
        return request.messages, getattr(request, "images", None), getattr(request, "tools", None)
    raise TypeError(f"expected a request with 'messages' (a dict, an InferRequest or a list of messages), got "
                    f"{type(request).__name__}")


class RewardTemplate:
    """The `template` a reward-model plugin gets: ms-swift's Template surface in train mode, on tunesmith's
    ChatEncoder with the reward model's tokenizer and chat template (--reward_template, else its own).
    task_type: "seq_cls" (a score head) or "causal_lm". model: the reward model. Rows are never truncated (ms-swift
    sets max_length None for reward templates)."""

    _OFFERS = "encode, data_collator, tokenizer, processor, model, task_type, mode, max_length"

    def __init__(self, tokenizer, task_type: str, model=None):
        from tunesmith.data.encode import ChatEncoder

        self.tokenizer = self.processor = tokenizer
        self.task_type, self.model = task_type, model
        self.mode, self.max_length = "train", None
        self.encoder = ChatEncoder(tokenizer)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"template.{name}: tunesmith's reward-model template offers ms-swift's {self._OFFERS}; "
                             f"{name} is not provided (write the plugin with those, or use tunesmith's encoder)")

    def encode(self, inputs, return_template_inputs: bool = False, return_length: bool = False) -> dict:
        """One request (`_request_parts`) → {"input_ids": [T]} rendered with the chat template, plus "labels" [T]
        for a causal-LM reward model (the assistant replies' ids, -100 elsewhere, unshifted: ms-swift's train
        mode), "lengths" [T] with return_length. A text reward model scores the text of a row with pictures (its
        `images` are not read). Raises NotImplementedError for return_template_inputs (ms-swift's TemplateInputs
        have no counterpart here) and for pictures on a vision-language reward model; DataError for a
        conversation the chat template refuses."""
        if return_template_inputs:
            raise NotImplementedError("template.encode(return_template_inputs=True): ms-swift's TemplateInputs have "
                                      "no counterpart in tunesmith; read the request's messages instead")
        messages, images, tools = _request_parts(inputs)
        if images and self.encoder.images is not None:
            raise NotImplementedError("template.encode with pictures on a vision-language reward model is not "
                                      "supported yet in reward-model plugins; the default plugin scores them")
        enc = self.encoder.encode({"messages": messages, **({"tools": tools} if tools else {})}, truncate=False)
        out = {"input_ids": list(enc.input_ids)}
        if self.task_type == "causal_lm":
            out["labels"] = list(enc.labels)
        if return_length:
            out["lengths"] = [len(enc.input_ids)]
        return out

    def data_collator(self, batch: list, *, padding_to: Optional[int] = None) -> dict:
        """Encoded rows → a batch padded on the right with the pad token: input_ids, attention_mask [B, T] int64
        (T the longest row, or padding_to when longer) and labels: [B, T] (-100 on padding) for a causal-LM reward
        model; None for a sequence classifier (ms-swift 4's seq_cls batches carry no labels; a None entry keeps
        3.x plugins' `batch.pop('labels')` working while `model(**batch)` computes no loss)."""
        import torch

        width = max([len(b["input_ids"]) for b in batch] + [padding_to or 0])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n], mask[i, :n] = torch.tensor(b["input_ids"]), 1
            if b.get("labels") is not None:
                labels[i, :n] = torch.tensor(b["labels"])
        return {"input_ids": ids, "attention_mask": mask,
                "labels": labels if self.task_type == "causal_lm" else None}


def _gen_config(request_config):
    """ms-swift's RequestConfig → tunesmith's GenConfig (None: the reward model's generation_config default;
    max_tokens None: all the room left in its context, as ms-swift's engines)."""
    from tunesmith.inference.chat import GenConfig

    rc = request_config or RequestConfig()
    return GenConfig(max_new_tokens=rc.max_tokens, temperature=rc.temperature, top_p=rc.top_p, top_k=rc.top_k,
                     repetition_penalty=rc.repetition_penalty, stop=list(rc.stop or []), seed=rc.seed,
                     n=max(1, rc.n or 1))


class TransformersEngine:
    """ms-swift's TransformersEngine (4.x; 3.x's PtEngine) as reward-model plugins build it, over the model and
    template they were given: `infer(requests, request_config)` generates with tunesmith's ChatEngine (continuous
    batching; the template's tokenizer and chat template) and returns one ChatCompletionResponse per request,
    request_config.n choices each. max_batch_size 0 (ms-swift's "no limit") sizes the batch from memory. Raises
    ConfigError for an engine asked to load a model of its own (a path) or built without the plugin's template."""

    def __init__(self, model, template=None, max_batch_size: int = 0, **kwargs):
        if isinstance(model, str) or not isinstance(template, RewardTemplate):
            raise ConfigError("a reward-model plugin's engine runs the reward model and template the plugin was "
                              "given: build it as TransformersEngine(self.model, template=self.template) (3.x: "
                              "PtEngine.from_model_template(self.model, self.template)); loading another model is "
                              "not supported")
        from tunesmith.inference.chat import ChatEngine

        self.model, self.default_template = model, template
        self.chat = ChatEngine(model, template.tokenizer, max_batch_size=max_batch_size or None)

    @classmethod
    def from_model_template(cls, model, template=None, max_batch_size: int = 0, **kwargs) -> "TransformersEngine":
        """ms-swift 3.x's PtEngine.from_model_template."""
        return cls(model, template, max_batch_size)

    def infer(self, infer_requests: list, request_config=None, metrics=None, *, use_tqdm=None, **kwargs) -> list:
        """One ChatCompletionResponse per request (`_request_parts`); every request's n sequences are submitted
        before any is awaited. Raises PromptTooLong, or the engine's error."""
        cfg = _gen_config(request_config)
        prompts = [self.chat.prompt(messages, tools) for messages, _, tools in map(_request_parts, infer_requests)]
        handles = [self.chat.submit(p, cfg) for p in prompts]
        out = []
        for prompt, hs in zip(prompts, handles):
            choices = []
            for i, h in enumerate(hs):
                done = h.result()
                reply = self.chat.reply(done, prompt, cfg)
                if reply.error is not None:
                    raise reply.error
                choices.append(ChatCompletionResponseChoice(i, ChatMessage("assistant", reply.content,
                                                                           reasoning_content=reply.reasoning),
                                                            reply.finish_reason, token_ids=list(done.token_ids)))
            out.append(ChatCompletionResponse(model=type(self.model).__name__, choices=choices))
        return out

    def close(self) -> None:
        """Stop the engine's scheduler thread."""
        self.chat.close()


class DefaultRMPlugin:
    """ms-swift's default reward-model plugin: each row encoded by the template, the batch through the model,
    logits[:, 0] — a sequence classifier's score — as the reward [N]."""

    def __init__(self, model, template):
        self.model, self.template = model, template

    def __call__(self, inputs, **kwargs):
        import torch

        batch = [self.template.encode(copy.deepcopy(row)) for row in inputs]
        batch = to_device(self.template.data_collator(batch), next(self.model.parameters()).device)
        with torch.inference_mode():
            return self.model(**batch).logits[:, 0]


_GENRM_SYSTEM = textwrap.dedent("""
    Based on the dialogue history, analyze in detail whether the model's response is accurate, complete, and relevant.
    Assign a reward score between 0 and 1, where 0 indicates completely incorrect and 1 indicates fully correct.
    Before finishing your response, please assign a reward using the following format:

    Reward: {reward}

    For example:
    Reward: 0.85
""")  # ms-swift 4.6's GenRMPlugin prompt, word for word: the judge is asked exactly what ms-swift asks it

_REWARD = re.compile(r"Reward:\s*([+-]?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][+-]?\d+)?)(?![0-9A-Za-z_]|\.\d)")


class GenRMPlugin(DefaultRMPlugin):
    """ms-swift's generative reward model (`genrm`): the conversation flattened into one user message ("User: …\\n
    Assistant: …") after a system prompt asking for "Reward: x" (x in [0, 1]); the judge's replies (RequestConfig's
    n, default 1) are parsed and averaged; a reply without a finite score counts for nothing, and a completion
    without any gets 0.0 (a warning), as ms-swift. Returns a float32 tensor [N]."""

    def __init__(self, model, template):
        super().__init__(model, template)
        self.engine = TransformersEngine(self.model, template=self.template, max_batch_size=0)
        self.request_config = RequestConfig()
        self.system = _GENRM_SYSTEM

    def __call__(self, inputs, **kwargs):
        import torch

        results = self.engine.infer(self.prepare_rm_inputs(inputs), self.request_config, use_tqdm=False)
        return torch.tensor(self.compute_rewards(results), dtype=torch.float32)

    def prepare_rm_inputs(self, inputs: list) -> list:
        """Each row (copied) with its messages replaced by [system prompt, the conversation as one user query]."""
        out = []
        for row in inputs:
            row = copy.deepcopy(row)
            row["messages"] = [{"role": "system", "content": self.system},
                               {"role": "user", "content": self.messages_to_query(row.get("messages"))}]
            out.append(row)
        return out

    @staticmethod
    def extract_reward(model_output: str) -> Optional[float]:
        """The finite number after "Reward:" (the whole number: no prefix of a longer one), else None (said once
        per call of the plugin, by compute_rewards, not once per reply as ms-swift)."""
        match = _REWARD.search(model_output or "")
        if match and math.isfinite(float(match.group(1))):
            return float(match.group(1))
        return None

    @staticmethod
    def messages_to_query(messages: list) -> str:
        """"Role: content" lines (User, Assistant, System; other roles capitalised), empty contents skipped.
        Raises TypeError for a message that is not a dict."""
        names = {"user": "User", "assistant": "Assistant", "system": "System"}
        lines = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise TypeError(f"Each message must be a dictionary. Found {type(m)} at index {i}.")
            if m.get("content"):
                lines.append(f"{names.get(m['role'].lower(), m['role'].capitalize())}: {m['content']}")
        return "\n".join(lines)

    def compute_rewards(self, results: list) -> list:
        """The mean parsed score of each response's choices; 0.0 when none parses (one warning per call, saying
        for how many completions)."""
        rewards, unscored = [], 0
        for output in results:
            scores = [r for r in (self.extract_reward(c.message.content) for c in output.choices) if r is not None]
            unscored += not scores
            rewards.append(sum(scores) / len(scores) if scores else 0.0)
        if unscored:
            logger.warning(f"genrm: the judge wrote no parseable 'Reward: x' for {unscored} of {len(results)} "
                           f"completions; each of them gets 0.0")
        return rewards


# the registry plugin files add to, as ms-swift's (swift/rewards/rm_plugin.py)
rm_plugins: dict = {"default": DefaultRMPlugin, "genrm": GenRMPlugin}
BUILT_IN = ("default", "genrm")

for _home in ("rewards", "rewards.rm_plugin", "plugin", "plugin.rm_plugin"):
    plugins.provide(_home, rm_plugins=rm_plugins, DefaultRMPlugin=DefaultRMPlugin, GenRMPlugin=GenRMPlugin)
for _home in ("utils", "llm"):
    plugins.provide(_home, to_device=to_device)
plugins.provide("infer_engine", TransformersEngine=TransformersEngine, PtEngine=TransformersEngine)
plugins.provide("llm", PtEngine=TransformersEngine, TransformersEngine=TransformersEngine, Template=RewardTemplate)
plugins.provide("template", Template=RewardTemplate)


def plugin_class(name: str, plugin_paths: list):
    """The class registered as `name`: the built-ins, what the --external_plugins files (run here unless already
    run) registered in `rm_plugins`, or in an installed ms-swift's. Raises ConfigError for an unknown name (naming
    those there are) or an entry that is not a class."""
    import difflib
    import os

    installed = {}
    for path in plugin_paths:
        path = os.path.abspath(os.path.expanduser(path))
        plugins.run_plugin(path, {})
        installed.update(plugins.plugin_registered(path, "rm_plugins"))
    found = {**rm_plugins, **installed}  # what a file registered, a built-in's name too, wins (as in ms-swift)
    cls = found.get(name)
    if cls is None:
        near = difflib.get_close_matches(name, list(found), n=1)
        raise ConfigError(f"--reward_model_plugin {name}: no such reward-model plugin"
                          + (f"; did you mean {near[0]}?" if near else "")
                          + f"; available: {', '.join(sorted(found))} (an --external_plugins file registers more as "
                            f"rm_plugins['name'] = MyPlugin, after `from swift.rewards import rm_plugins`)")
    if not isinstance(cls, type) or not callable(getattr(cls, "__call__", None)):
        raise ConfigError(f"--reward_model_plugin {name}: rm_plugins[{name!r}] is {cls!r}, not a plugin class "
                          f"(a class built as Cls(model=..., template=...) whose __call__(inputs) returns rewards)")
    if inspect.iscoroutinefunction(cls.__call__):
        raise ConfigError(f"--reward_model_plugin {name}: {cls.__name__}.__call__ is async, but reward-model "
                          f"plugins are called synchronously (as ms-swift calls them); define it with `def`, not "
                          f"`async def`")
    return cls


def build_plugin(name: str, cls, model, template):
    """cls(model=model, template=template), imports of ms-swift inside its constructor finding the stand-in.
    Raises ConfigError naming the plugin when the constructor fails."""
    try:
        with plugins.stand_in():
            return cls(model=model, template=template)
    except ConfigError as e:
        raise ConfigError(f"--reward_model_plugin {name}: {e}") from e
    except Exception as e:  # noqa: BLE001 — the plugin's constructor: one clear message
        raise ConfigError(f"--reward_model_plugin {name}: {cls.__name__}(model=..., template=...) failed: "
                          f"{type(e).__name__}: {e}") from e


class PluginReward:
    """A reward-model plugin as a reward function (scoring.RewardFn's fn): the reward functions' keyword arguments
    → ms-swift's reward rows (`inputs`), the plugin called as ms-swift calls it, on its own copy of them (what it
    changes no other reward sees), its output as one float (or None) per completion. `error_label` names it in
    scoring's messages."""

    _BATCH_ONLY = ("trainer_state", "prompts", "completion_ids")  # not per-row values

    def __init__(self, name: str, plugin, path: str = ""):
        self.name, self.plugin = name, plugin
        self.error_label = f"--reward_model_plugin {name}" + (f" (on --reward_model {path})" if path else "")
        params = inspect.signature(plugin.__call__).parameters.values()
        self.takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)

    def rows(self, completions: list, kwargs: dict) -> list:
        """One dict per completion: every per-completion keyword argument's value (messages, the dataset
        columns, response_token_ids, …), as ms-swift's GRPOSample.to_reward_row."""
        n = len(completions)
        columns = {k: v for k, v in kwargs.items()
                   if k not in self._BATCH_ONLY and isinstance(v, (list, tuple)) and len(v) == n}
        return [{k: v[i] for k, v in columns.items()} for i in range(n)]

    def __call__(self, completions: list, **kwargs):
        """The plugin's rewards for the completions: a 1-D tensor or array as a list of floats, anything else as
        returned (scoring checks it and says what is wrong). Raises ConfigError when the plugin raises (naming what
        it was given) or returns a coroutine (closed: it is never awaited)."""
        rows = copy.deepcopy(self.rows(completions, kwargs))
        given = {k: v if k == "trainer_state" else copy.deepcopy(v) for k, v in kwargs.items()}
        try:
            out = self.plugin(inputs=rows, **given) if self.takes_kwargs else self.plugin(inputs=rows)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 — the plugin's code: one clear message
            keys = ", ".join(sorted(rows[0])) if rows else "no keys"
            extra = f", and the keyword arguments {', '.join(sorted(given))}" if self.takes_kwargs else ""
            raise ConfigError(f"{self.error_label} raised {type(e).__name__}: {e} (it was given inputs: {len(rows)} "
                              f"rows with {keys}{extra})") from e
        if inspect.isawaitable(out):
            if hasattr(out, "close"):
                out.close()  # never awaited: closed, so that Python does not warn about it
            raise ConfigError(f"{self.error_label} returned a coroutine: its __call__ is async, but reward-model "
                              f"plugins are called synchronously (as ms-swift calls them); define it with `def`")
        if hasattr(out, "tolist") and not isinstance(out, (list, tuple)) and getattr(out, "ndim", None) == 1:
            return out.float().tolist() if hasattr(out, "float") else out.tolist()
        return out
