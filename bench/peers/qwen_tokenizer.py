"""The real Qwen2.5 tokenizer, rebuilt offline: Qwen's 151,643 BPE ranks + its 22 added tokens + its chat template.

The ranks file (`qwen.tiktoken`) ships inside the `dashscope` wheel on PyPI; it is fetched with
`pip download dashscope --no-deps` into a cache directory and read from the wheel (dashscope itself is never
installed). transformers' TikTokenConverter turns the ranks into a byte-level BPE `tokenizers` model; the
pre-tokenizer regex, NFC normalizer, added tokens (ids 151643-151664) and chat template are Qwen2.5-Instruct's, so
prompts encode to the token ids the real model sees ("Hello world" -> [9707, 1879]).

    python bench/peers/qwen_tokenizer.py OUT_DIR      # saves the tokenizer, prints a check
"""
from __future__ import annotations

import base64
import glob
import json
import os
import subprocess
import sys
import tempfile
import zipfile

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "tunesmith-bench")  # outside the repo
# Qwen2's split regex: like cl100k's but digits are split one by one (\p{N}, not \p{N}{1,3}).
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
# (content, special) in id order from 151643; the last eight are plain added tokens in Qwen2.5's tokenizer_config.
ADDED = [(t, True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                             "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
                             "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")]
ADDED += [(t, False) for t in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                               "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")]
CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def qwen_ranks_file() -> str:
    """Path to qwen.tiktoken, extracted once from the dashscope wheel into bench/.cache."""
    out = os.path.join(CACHE, "qwen.tiktoken")
    if os.path.exists(out):
        return out
    os.makedirs(CACHE, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "dashscope", "-d", tmp],
                       check=True)
        with zipfile.ZipFile(glob.glob(os.path.join(tmp, "dashscope-*.whl"))[0]) as z:
            data = z.read("dashscope/resources/qwen.tiktoken")
    with open(out + ".tmp", "wb") as fh:
        fh.write(data)
    os.replace(out + ".tmp", out)
    return out


def build_qwen25_tokenizer(out_dir: str):
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(path):  # the `tiktoken` package is not needed to read "base64 rank" lines
            with open(path, "rb") as fh:
                return {base64.b64decode(tok): int(rank) for tok, rank in (ln.split() for ln in fh if ln.strip())}

    tk = _Converter(vocab_file=qwen_ranks_file(), pattern=PATTERN).converted()
    tk.normalizer = normalizers.NFC()
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, s in ADDED if s])
    tk.add_tokens([AddedToken(t, normalized=False, special=False) for t, s in ADDED if not s])
    assert tk.token_to_id("<|im_end|>") == 151645 and tk.get_vocab_size() == 151665, tk.get_vocab_size()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token=None, bos_token=None, clean_up_tokenization_spaces=False,
                                  model_max_length=131072, split_special_tokens=False)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    # Declare the class the real checkpoint declares, so every loader (ms-swift's older transformers too) treats it
    # as a Qwen2 tokenizer; the tokenizer.json above is what all of them read.
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh, indent=2, ensure_ascii=False)
    return tok


def copy_cached_qwen25_tokenizer(out_dir: str) -> None:
    """Write the Qwen2.5 tokenizer files into out_dir, building them once into the cache (later calls only copy:
    the BPE conversion of 151,643 ranks takes ~20 s)."""
    import shutil

    cached = os.path.join(CACHE, "qwen25-tokenizer")
    if not os.path.isfile(os.path.join(cached, "tokenizer.json")):
        build_qwen25_tokenizer(cached)
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(cached):
        shutil.copy(os.path.join(cached, name), out_dir)


if __name__ == "__main__":
    from transformers import AutoTokenizer

    build_qwen25_tokenizer(sys.argv[1])
    t = AutoTokenizer.from_pretrained(sys.argv[1])
    print(type(t).__name__, len(t), t("Hello world")["input_ids"],
          t.apply_chat_template([{"role": "user", "content": "Hi 123"}], tokenize=False, add_generation_prompt=True))
