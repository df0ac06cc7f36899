"""The built-in tiny tokenizers: a byte-level BPE trained here, offline, in a second, with a model family's special
tokens and chat template. `tunesmith data` uses one when no --model is given; tests, the demo and benchmarks build
their tiny models on them (tunesmith.testing).

The chat templates below reproduce the behaviour of the main families' official templates, quirks included:
- ``chatml``: Qwen2.5 (default system prompt when none is given).
- ``qwen3``: Qwen3 hybrid thinking: `<think>` blocks of assistant turns before the last user query are stripped,
  the final turn always renders a (possibly empty) think block, `enable_thinking=False` adds an empty one to the
  generation prompt.
- ``llama3``: Llama-3 header tokens, `<|eot_id|>` ends every turn, contents are trimmed.
- ``gpt_oss``: Harmony: system block, system messages become developer instructions, `thinking` is rendered only
  for a final assistant turn, which ends in `<|return|>` while earlier turns end in `<|end|>`.
"""
from __future__ import annotations

import functools
import os
import random


SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",                                  # ChatML / Qwen
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",   # Llama 3
    "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>",  # gpt-oss harmony
    "<|pad|>",
]


PLAIN_ADDED_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]


CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}"
    "{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' and message.content is string and "
    "not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- set content = message.content if message.content is string else '' %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}"
    "{%- else %}{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


GPT_OSS_TEMPLATE = (
    "{{- '<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\\n"
    "Knowledge cutoff: 2024-06\\nCurrent date: 2025-08-12\\n\\nReasoning: medium\\n\\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>' }}"
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|start|>developer<|message|># Instructions\\n\\n' + messages[0].content + '\\n\\n<|end|>' }}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- if loop.last and not add_generation_prompt %}"
    "{%- if message.thinking is defined and message.thinking %}"
    "{{- '<|start|>assistant<|channel|>analysis<|message|>' + message.thinking + '<|end|>' }}{%- endif %}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|return|>' }}"
    "{%- else %}{{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|end|>' }}{%- endif %}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|start|>functions.tool to=assistant<|channel|>commentary<|message|>' + message.content + '<|end|>' }}"
    "{%- else %}{{- '<|start|>' + message.role + '<|message|>' + message.content + '<|end|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}"
)


# Qwen2-VL / Qwen2.5-VL's official template: a message's content is a string or a list of parts; each image part
# renders as <|vision_start|><|image_pad|><|vision_end|> (the processor expands the pad to one token per merged patch).
QWEN_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

FAMILIES = {
    # family: (template, eos, pad, bos)
    "chatml": (CHATML_TEMPLATE, "<|im_end|>", "<|endoftext|>", None),
    "qwen2": (CHATML_TEMPLATE, "<|im_end|>", "<|endoftext|>", None),
    "qwen3": (QWEN3_TEMPLATE, "<|im_end|>", "<|endoftext|>", None),
    "llama3": (LLAMA3_TEMPLATE, "<|eot_id|>", "<|pad|>", "<|begin_of_text|>"),
    "llama": (LLAMA3_TEMPLATE, "<|eot_id|>", "<|pad|>", "<|begin_of_text|>"),
    "gpt_oss": (GPT_OSS_TEMPLATE, "<|return|>", "<|pad|>", None),
    # vision-language: their special tokens are added after the text families' (VISION_TOKENS)
    "qwen2_vl": (QWEN_VL_TEMPLATE, "<|im_end|>", "<|endoftext|>", None),
    "qwen2_5_vl": (QWEN_VL_TEMPLATE, "<|im_end|>", "<|endoftext|>", None),
    "qwen3_vl": (QWEN_VL_TEMPLATE, "<|im_end|>", "<|endoftext|>", None),
}
VL_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# ms-swift's template names (--template) -> the family above whose tokenizer and chat template they stand for
TEMPLATE_FAMILIES = {"qwen2": "qwen2", "qwen2_5": "qwen2", "qwen": "qwen2", "qwen2_5_math": "qwen2", "qwen3": "qwen3",
                     "qwen3_thinking": "qwen3", "qwen3_nothinking": "qwen3", "llama3": "llama3", "llama3_1": "llama3",
                     "llama3_2": "llama3", "llama3_3": "llama3", "llama": "llama3", "gpt_oss": "gpt_oss",
                     "gpt-oss": "gpt_oss", "chatml": "chatml", "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl",
                     "qwen3_vl": "qwen3_vl"}


_WORDS = ("the a an of to in is it you that he was for on are with as his they be at one have this from or had by "
          "word but what some we can out other were all there when up use your how said each she which do their "
          "time if will way about many then them write would like so these her long make thing see him two has "
          "look more day could go come did number sound no most people my over know water than call first who "
          "may down side been now find any new work part take get place made live where after back little only "
          "round man year came show every good me give our under name very through just form sentence great think "
          "say help low line differ turn cause much mean before move right boy old too same tell does set three "
          "want air well also play small end put home read hand port large spell add even land here must big high "
          "such follow act why ask men change went light kind off need house picture try us again animal point "
          "mother world near build self earth father head stand own page should country found answer school grow "
          "study still learn plant cover food sun four between state keep eye never last let thought city tree "
          "cross farm hard start might story saw far sea draw left late run while press close night real life few "
          "north open seem together next white children begin got walk example ease paper group always music those "
          "both mark often letter until mile river car feet care second book carry took science eat room friend "
          "began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl "
          "usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song "
          "measure door product black short numeral class wind question happen complete ship area half rock order "
          "fire south problem piece told knew pass since top whole king space heard best hour better true during "
          "hundred five remember step early hold west ground interest reach fast verb sing listen six table travel "
          "less morning ten simple several vowel toward war lay against pattern slow center love person money serve "
          "appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry "
          "dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood "
          "contain front teach week final gave green oh quick develop ocean warm free minute strong special mind "
          "behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object "
          "decide surface deep moon island foot system busy test record boat common gold possible plane stead dry "
          "wonder laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes distant "
          "fill east paint language among capital France Paris Japan Tokyo Italy Rome Spain Madrid Germany Berlin "
          "Canada Ottawa Egypt Cairo Kenya Nairobi Brazil Australia Canberra Repeat after me Answer user assistant "
          "system helpful translate Step domain name").split()


_ZH = "你是个有用无害的助手告诉我明天的天气晴朗不知道等于几再加呢数学计算器翻译添加域名喵本雪主要功能让开心用可爱猫娘之力治愈心灵呜焦虑怎么办"


def _corpus(n_lines: int = 6000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        k = rng.randint(3, 14)
        line = " ".join(rng.choice(_WORDS) for _ in range(k))
        if rng.random() < 0.3:
            line = line.capitalize() + rng.choice([".", "?", "!", ":"])
        if rng.random() < 0.2:
            line += " " + "".join(rng.choice(_ZH) for _ in range(rng.randint(2, 12)))
        if rng.random() < 0.15:
            line += f" {rng.randint(0, 999)} + {rng.randint(0, 99)} = {rng.randint(0, 1100)}"
        lines.append(line)
    lines += ["{\"role\": \"assistant\", \"content\": \"\"}", "\n\n", "<think>\n\n</think>\n\n"] * 20
    return lines


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


OFFICIAL_TEMPLATES = {"chatml": "qwen2_5", "qwen2": "qwen2_5", "qwen3": "qwen3", "gpt_oss": "gptoss",
                      "llama3": "llama3_1", "llama": "llama3_1"}


def official_template_names() -> list[str]:
    """The ms-swift template names (--template) whose family's official chat template tunesmith carries."""
    return sorted(n for n, family in TEMPLATE_FAMILIES.items() if family in OFFICIAL_TEMPLATES)


def official_template_for(name: str) -> str:
    """The official chat template (jinja text) of an ms-swift template name (qwen2_5, qwen3, llama3_1, gpt_oss, …;
    case-insensitive). Raises KeyError for a name without one (official_template_names lists those there are)."""
    return load_official_template(TEMPLATE_FAMILIES[name.lower()])


def load_official_template(family: str) -> str:
    """The model family's official chat template (tools, tool calls, reasoning), from tunesmith/assets."""
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "chat_templates", OFFICIAL_TEMPLATES[family] + ".jinja")
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def build_tokenizer(family: str = "qwen2", vocab_size: int = 2048, official_template: bool = False):
    """A byte-level BPE tokenizer (trained here, offline) with the family's special tokens and chat template
    (official_template: the real model's template instead of the compact one above)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    template, eos, pad, bos = FAMILIES[family]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
                                  eos_token=eos, pad_token=pad, bos_token=bos, unk_token=None)
    tok.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (eos, pad, bos)]})
    tok.add_tokens(PLAIN_ADDED_TOKENS)
    if family in VL_FAMILIES:
        tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS}, replace_extra_special_tokens=False)
    tok.chat_template = load_official_template(family) if official_template else template
    tok.model_max_length = 4096
    return tok
