"""The tokenizer half of a GGUF file (tokenizer.ggml.*, tokenizer.chat_template): what makes llama.cpp split and
number text exactly as the Hugging Face tokenizer does.

Written as llama.cpp's converter writes a byte-level BPE (TextModel._set_vocab_gpt2 / get_vocab_base and
gguf.SpecialVocab in convert_hf_to_gguf): model "gpt2", the tokens by id (ids the embedding has but the tokenizer
lacks become `[PAD{id}]`, UNUSED), their types (NORMAL; an added token CONTROL when special or looking special
(`<|...|>`), else USER_DEFINED), the merges (a space inside a merge part spelled U+0120+... as SpecialVocab does), the
special token ids, add_bos/add_eos as the tokenizer behaves, and the chat template verbatim.

`tokenizer.ggml.pre` names the pre-tokenizer llama.cpp runs in place of tokenizer.json's. llama.cpp's converter
recognises it by hashing the ids of a probe text; here it is read from the pre-tokenizer itself: the split regex must
be one that the vendored llama.cpp's src/llama-vocab.cpp implements (its `tokenizer_pre` names: "gpt-2" for
GPT-2's ByteLevel regex, "qwen2", "llama-bpe", "gpt-4o" for o200k / gpt-oss), anything else is refused
(`vocab_problem`) rather than written as a GGUF that loads but tokenises differently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

# the split regexes of tokenizer.json as the models ship them -> llama.cpp's pre-tokenizer name
# (src/llama-vocab.cpp keeps each original regex in a comment beside its adapted one)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
               r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {QWEN2_SPLIT: "qwen2", LLAMA3_SPLIT: "llama-bpe", GPT4O_SPLIT: "gpt-4o"}
GPT2_PRE = "gpt-2"  # ByteLevel(use_regex=True): GPT-2's own regex, LLAMA_VOCAB_PRE_TYPE_GPT2
# gguf.TokenType values (gguf/constants.py), kept here so this module imports nothing heavy at load
NORMAL, UNUSED, CONTROL, USER_DEFINED = 1, 5, 3, 4
# the texts llama.cpp makes end-of-generation tokens by itself (src/llama-vocab.cpp, special_eog_ids)
_EOG_BY_TEXT = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
                "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
                "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>"}


@dataclass(frozen=True)
class Vocab:
    """Everything tokenizer.ggml.* holds: tokens and types by id, merges, the pre-tokenizer name, special ids
    (None: not written), add_bos/add_eos, the chat template (a string, or [{'name', 'template'}] for named ones)."""
    tokens: tuple[str, ...]
    types: tuple[int, ...]
    merges: tuple[str, ...]
    pre: str
    bos: int | None
    eos: int | None
    eot: int | None
    eom: int | None
    pad: int | None
    unk: int | None
    add_bos: bool
    add_eos: bool
    chat_template: object


def tokenizer_json(tokenizer) -> dict | None:
    """tokenizer.json of a fast Hugging Face tokenizer as a dict; None for a slow (Python) tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else None


def _pieces(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    return list(pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]


def pre_tokenizer_name(tj: dict) -> str | None:
    """llama.cpp's tokenizer.ggml.pre for tokenizer.json tj, or None when llama.cpp has no pre-tokenizer that
    splits text the same way."""
    pieces = _pieces(tj.get("pre_tokenizer"))
    if len(pieces) == 1 and pieces[0].get("type") == "ByteLevel" and pieces[0].get("use_regex", True) \
            and not pieces[0].get("add_prefix_space"):
        return GPT2_PRE
    if len(pieces) == 2 and [p.get("type") for p in pieces] == ["Split", "ByteLevel"]:
        split, byte_level = pieces
        regex = (split.get("pattern") or {}).get("Regex")
        if split.get("behavior") == "Isolated" and not split.get("invert") and \
                not byte_level.get("use_regex", True) and not byte_level.get("add_prefix_space"):
            return SPLITS.get(regex)
    return None


def vocab_problem(tokenizer) -> str | None:
    """Why llama.cpp would not tokenise as this Hugging Face tokenizer does, as one message, or None: not a fast
    tokenizer, not byte-level BPE, a normalizer other than none/NFC (Qwen2's NFC is what every Qwen GGUF drops:
    llama.cpp has no normalizer for BPE), or a pre-tokenizer outside the ones named in this module's docstring."""
    tj = tokenizer_json(tokenizer)
    if tj is None:
        return "it is a slow (Python) tokenizer; save the model with its tokenizer.json (a fast tokenizer)"
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        return (f"its tokenizer is {model.get('type')} with a {(tj.get('decoder') or {}).get('type')} decoder; "
                f"only byte-level BPE tokenizers (Qwen, Llama 3, gpt-oss, GPT-2) are written to GGUF here")
    normalizer = (tj.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        return f"its tokenizer normalises text ({normalizer}), which llama.cpp's BPE tokenizer does not"
    if pre_tokenizer_name(tj) is None:
        pre = json.dumps(tj.get("pre_tokenizer"), ensure_ascii=False)
        return (f"its pre-tokenizer {pre[:300]} is not one llama.cpp reproduces (known: GPT-2's ByteLevel, and the "
                f"split regexes of Qwen2, Llama 3 and o200k/gpt-oss); a GGUF of it would tokenise differently")
    return None


def _merges(model: dict) -> tuple[str, ...]:
    """tokenizer.json merges as "a b" strings; a space inside a part becomes chr(ord(' ') + 256), as
    gguf.SpecialVocab._try_load_from_tokenizer_json writes the list-of-pairs form."""
    merges = model.get("merges") or []
    if merges and not isinstance(merges[0], str):
        space = chr(ord(" ") + 256)
        merges = [f"{a.replace(' ', space)} {b.replace(' ', space)}" for a, b in merges]
    return tuple(merges)


def _looks_special(token: str) -> bool:
    """TextModel.does_token_look_special, for the tokens of byte-level BPE vocabularies."""
    return (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>")) \
        or token in ("<pad>", "<mask>")


def _tokens(tokenizer, n_vocab: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """get_vocab_base: tokens and types for ids 0..n_vocab-1."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(CONTROL if added[i].special or _looks_special(added[i].content) else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)
    return tuple(tokens), tuple(types)


def _eos_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _end_ids(tokenizer, config: dict, generation_config: dict | None, tokens) -> tuple:
    """(eos, eot, eom). eos is the tokenizer's (tokenizer_config's eos_token, as the converter takes it), else
    config.json's; eot is eos (the end of a turn for a chat model: <|im_end|>, <|eot_id|>, <|return|>); eom the
    other id of generation_config's eos_token_id list that ends a tool call (Llama 3.1's <|eom_id|>, gpt-oss's
    <|call|>), else the first one llama.cpp would not find by its text (llama-vocab.cpp's special_eog_ids), so that
    llama.cpp stops wherever transformers' generate stops."""
    gen = _eos_ids((generation_config or {}).get("eos_token_id"))
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = next(iter(_eos_ids(config.get("eos_token_id")) + gen), None)
    others = [i for i in gen if i != eos and i < len(tokens)]
    eom = next((i for i in others if tokens[i] in ("<|eom_id|>", "<|call|>")), None)
    if eom is None:
        eom = next((i for i in others if tokens[i] not in _EOG_BY_TEXT), None)
    return eos, eos, eom


def _adds(tokenizer, bos: int | None, eos: int | None) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS, read from what the tokenizer does to a short text."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    extra = len(full) > len(plain)
    return bool(extra and bos is not None and full[0] == bos), bool(extra and eos is not None and full[-1] == eos)


def build_vocab(tokenizer, n_vocab: int, config: dict, generation_config: dict | None = None) -> Vocab:
    """The tokenizer metadata for a model whose embedding has n_vocab rows (>= the tokenizer's ids; the converter
    pads the rest with [PAD{id}]). Call vocab_problem first: this assumes a byte-level BPE llama.cpp knows."""
    tj = tokenizer_json(tokenizer)
    tokens, types = _tokens(tokenizer, n_vocab)
    eos, eot, eom = _end_ids(tokenizer, config, generation_config, tokens)
    bos = tokenizer.bos_token_id
    if bos is None and isinstance(config.get("bos_token_id"), int):
        bos = config["bos_token_id"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.get("pad_token_id")
    add_bos, add_eos = _adds(tokenizer, tokenizer.bos_token_id, eos)
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    return Vocab(tokens=tokens, types=types, merges=_merges(tj.get("model") or {}), pre=pre_tokenizer_name(tj),
                 bos=bos, eos=eos, eot=eot, eom=eom, pad=pad if isinstance(pad, int) else None,
                 unk=tokenizer.unk_token_id, add_bos=add_bos, add_eos=add_eos, chat_template=template)


def add_vocab_kv(writer, vocab: Vocab) -> None:
    """vocab into writer's key/value metadata (tokenizer.ggml.*, tokenizer.chat_template), through GGUFWriter's
    add_* methods as TextModel._set_vocab_gpt2 and SpecialVocab.add_to_gguf call them."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(list(vocab.tokens))
    writer.add_token_types(list(vocab.types))
    writer.add_token_merges(list(vocab.merges))
    for value, add in ((vocab.bos, writer.add_bos_token_id), (vocab.eos, writer.add_eos_token_id),
                       (vocab.eot, writer.add_eot_token_id), (vocab.eom, writer.add_eom_token_id),
                       (vocab.pad, writer.add_pad_token_id), (vocab.unk, writer.add_unk_token_id)):
        if value is not None and 0 <= value < len(vocab.tokens):
            add(int(value))
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
