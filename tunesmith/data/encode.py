"""Turn a canonical record into token ids and labels with the model's own chat template.

Which tokens are trained is derived from the rendering itself, with no per-model template code:

1. F = the template's rendering of the whole conversation (what the model is trained on, token for token).
2. Assistant turn i starts where the rendering of the messages before it *with the generation prompt* ends: that
   is exactly what the model sees at inference before it starts to answer. That render must be a prefix of F.
3. Turn i ends at its end-of-turn token. Its position is found from the next message: the message is rendered
   with a sentinel as content, which locates where its content begins in F. What lies between the end of an
   assistant reply and the next content (e.g. `<|im_end|>\\n<|im_start|>user\\n`) is the same for any reply, so
   it is measured once on a dummy conversation and stepped back over. The end-of-turn token is the first special
   token of that stretch (`<|im_end|>`, `<|eot_id|>`, `<|end|>`; for the final turn `<|return|>` in gpt-oss).
   A reply with `tool_calls` (rendered by the template itself) ends at the first special token after its calls,
   measured the same way on a dummy call (`<|im_end|>`, `<|eot_id|>`, gpt-oss `<|call|>`), and must name every
   call: a template that drops one (no parallel calls) is an error, not a shorter reply.
4. Labels are set on the tokens of F whose first character lies in a trained span, so they match the final
   rendering exactly, also for templates that render a turn differently once later turns follow (Qwen3 drops
   earlier `<think>` blocks; gpt-oss ends the last turn with `<|return|>` and earlier ones with `<|end|>`).

Every position is checked against F; a template that breaks these assumptions gets a clear error, never a
silently wrong mask: a bad row (file:line; dropped under --strict false) where it depends on the row, as gpt-oss
keeping the text next to a tool call only in the last turn.

What lives here: rendering, label masking, truncation and the (optionally forked) encoding of a whole dataset. What
must not: reading or normalising rows (`tunesmith.data.load`, `tunesmith.data.formats`), tensors and padding
(`tunesmith.data.collate`), model code. No torch import: encodings are plain lists of ints.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from tunesmith.data.images import IMAGE_TAG
from tunesmith.data.vision import expand_images
from tunesmith.errors import ConfigError, DataError

IGNORE = -100
_SENTINEL = "\u2063TSENT\u2063"
_DUMMY_REPLY = "\u2063TREPLY\u2063"
# ms-swift >= 3.12 ignore_empty_think: anchored at the start of each trained reply.
_EMPTY_THINK = [re.compile(r"<think>\s*</think>\s*"), re.compile(r"</think>\s*")]

BASE_LOSS_SCALES = ("default", "last_round", "all")


def parse_loss_scale(value: Optional[str], default: str) -> tuple[str, bool]:
    """'last_round+ignore_empty_think' -> ('last_round', True). Accepts ms-swift 3.x and 4.x spellings.

    value: the --loss_scale flag (None or "" -> `default`). Returns (one of BASE_LOSS_SCALES, ignore_empty_think).
    Raises ConfigError for any other part."""
    value = (value or default).strip()
    aliases = {"last_round_with_ignore_empty_think": "last_round+ignore_empty_think",
               "ignore_empty_think": "default+ignore_empty_think"}
    value = aliases.get(value, value)
    parts = [p for p in value.split("+") if p]
    base, ignore = "default", False
    for p in parts:
        if p in BASE_LOSS_SCALES:
            base = p
        elif p == "ignore_empty_think":
            ignore = True
        else:
            raise ConfigError(f"--loss_scale: unknown part {p!r} in {value!r}; use default, last_round or all, "
                              f"optionally with +ignore_empty_think")
    return base, ignore


class TooLong(Exception):
    """A row over --max_length with --truncation_strategy delete: dropped and counted by the caller."""


class NothingToTrain(Exception):
    """A row whose labels are all masked (every reply has loss false, or truncation removed them)."""


@dataclass
class Encoded:
    """One encoded sequence: input_ids [T] token ids and labels [T] (the id where trained, else IGNORE = -100;
    unshifted: the loss shifts them)."""
    input_ids: list[int]
    labels: list[int]
    margin: Optional[float] = None  # a pair's chosen side: the row's reward margin (reward models), if given
    channel: Optional[str] = None  # the row's `channel` (--enable_channel_loss), if given
    images: Optional[list] = None  # the pictures of its image placeholders, in order (references: path or URL)
    tag: Optional[str] = None     # the row's routing tag (GKD's --teacher_tag_key column: which teacher server)

    @property
    def n_trained(self) -> int:
        """Number of trained tokens (labels that are not IGNORE)."""
        return sum(1 for x in self.labels if x != IGNORE)


_UNALIGNED_FIX = ("reshape the row as the model's template expects (gpt-oss, for one, renders the text next to a "
                  "tool call as analysis and keeps it only in the last turn: drop that text or move it to its own "
                  "reply), or drop the row (--strict false).")


def _unaligned(i: int, messages: list[dict], how: str) -> str:
    """The problem text of a reply whose trained tokens cannot be located in the template's rendering: which reply
    (counted among the assistant turns, as the user wrote them) and what the template does."""
    n = sum(m["role"] == "assistant" for m in messages[:i]) + 1
    calls = " (with tool calls)" if messages[i].get("tool_calls") else ""
    return (f"cannot locate assistant reply {n}{calls} in the chat template's rendering: the template {how}; "
            f"tunesmith trains exactly the tokens the template renders, so this row cannot be trained")


class ChatEncoder:
    """Encodes canonical records for one tokenizer and one set of template/loss settings.

    Construction raises ConfigError: an unknown --loss_scale part, no chat template while `use_chat_template`,
    or a slow tokenizer (character offsets are needed to align labels)."""

    def __init__(self, tokenizer, *, loss_scale: Optional[str] = None, default_loss_scale: str = "default",
                 max_length: Optional[int] = None, truncation_strategy: str = "delete",
                 system: Optional[str] = None, use_chat_template: bool = True, images=None):
        self.tok = tokenizer
        self.images = images  # tunesmith.data.vision.ImageTokens of a vision-language model, else None
        self.base, self.ignore_empty_think = parse_loss_scale(loss_scale, default_loss_scale)
        self.max_length = max_length
        self.truncation = truncation_strategy
        self.system = system
        self.use_chat_template = use_chat_template
        if use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("the tokenizer has no chat template. Use a model that ships one (an instruct/chat "
                              "model), or pass --use_chat_template false to train on plain text.")
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("a fast tokenizer (tokenizer.json) is needed to align labels with the template.")
        self.special = sorted({t for t in tokenizer.all_special_tokens if t}, key=len, reverse=True)
        self._tails: dict[str, tuple[str, str]] = {}
        self._around: Optional[tuple[list, list]] = None  # plain text: the tokenizer's own specials (`_plain`)

    # -------------------------------------------------------------- rendering

    def _template_messages(self, messages: list[dict]) -> list[dict]:
        out = []
        for m in messages:
            m2 = {k: v for k, v in m.items() if k != "loss"}
            if self.images is not None and isinstance(m2.get("content"), str) and IMAGE_TAG in m2["content"]:
                m2["content"] = image_parts(m2["content"])  # the template renders each image part's placeholder
            if "reasoning_content" in m2:
                m2["thinking"] = m2["reasoning_content"]  # gpt-oss reads `thinking`, Qwen3 `reasoning_content`
            out.append(m2)
        return out

    def with_system(self, messages: list[dict]) -> list[dict]:
        """A new list: `messages` with the --system prompt first when one is set and they have no system message."""
        if self.system and not (messages and messages[0]["role"] == "system"):
            return [{"role": "system", "content": self.system}] + list(messages)
        return list(messages)

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools=None, **template_kwargs) -> str:
        """The chat template's text for `messages` (per-message "loss" dropped; `reasoning_content` also passed as
        `thinking`). tools and template_kwargs go to the template. The template's own errors (e.g. jinja2's
        TemplateError from `raise_exception`) propagate."""
        kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs)
        if tools:
            kwargs["tools"] = tools
        return self.tok.apply_chat_template(self._template_messages(messages), **kwargs)

    def _first_special(self, text: str) -> tuple[int, int]:
        """(start, end) offsets of the first special token in text ((0, 0) if none)."""
        best = None
        for s in self.special:
            k = text.find(s)
            if k >= 0 and (best is None or k < best[0]):
                best = (k, k + len(s))
        return best or (0, 0)

    def _first_special_end(self, text: str) -> int:
        """End offset of the first special token in text (0 if none)."""
        return self._first_special(text)[1]

    def _tail(self, next_role: Optional[str]) -> tuple[str, str]:
        """(text between an assistant reply's end and the next content, its trained end-of-turn part)."""
        key = next_role or "<end>"
        if key not in self._tails:
            tail = self._after_dummy({"role": "assistant", "content": _DUMMY_REPLY}, next_role,
                                     "the chat template does not render assistant content verbatim; "
                                     "cannot derive a loss mask from it")
            self._tails[key] = (tail, tail[: self._first_special_end(tail)])
        return self._tails[key]

    def _after_dummy(self, reply: dict, next_role: Optional[str], missing: str) -> str:
        """The rendering of [user, `reply`, next_role's sentinel message] from the end of the dummy marker in the
        reply to the sentinel (or the end). Raises ConfigError(`missing`) when the marker is not rendered."""
        msgs = [{"role": "user", "content": "hello"}, reply]
        if next_role:
            msgs.append({"role": next_role, "content": _SENTINEL})
        text = self.render(msgs)
        a = text.find(_DUMMY_REPLY)
        if a < 0:
            raise ConfigError(missing)
        return text[a + len(_DUMMY_REPLY):text.find(_SENTINEL) if next_role else len(text)]

    def _call_tail(self, next_role: Optional[str], name: str) -> tuple[str, str]:
        """For a reply that ends in tool calls: (its end-of-turn special token, the text between that token and the
        next message's content, or the end). Measured on a dummy call to `name` (the reply's last call: gpt-oss
        names it in the tool result's header) whose arguments hold a marker: the first special token after the
        marker ends the turn (`<|im_end|>`, `<|eot_id|>`, gpt-oss `<|call|>`).
        Raises ConfigError when the template renders no tool calls, or none followed by a special token."""
        key = ("<calls>", next_role or "<end>", name)
        if key not in self._tails:
            call = {"type": "function", "function": {"name": name, "arguments": {"k": _DUMMY_REPLY}}}
            rest = self._after_dummy({"role": "assistant", "content": "", "tool_calls": [call]}, next_role,
                                     "the chat template does not render assistant tool_calls, so rows with tool "
                                     "calls cannot be trained with it; use a model whose chat template supports tools")
            k0, k1 = self._first_special(rest)
            if k1 == 0:
                raise ConfigError("the chat template ends a tool-call reply without a special token; "
                                  "cannot derive a loss mask from it")
            self._tails[key] = (rest[k0:k1], rest[k1:])
        return self._tails[key]

    def _reply_tail(self, reply: dict, next_role: Optional[str]) -> tuple[str, str]:
        """(the text that ends where the next message's content (or the rendering) ends, the trained first part
        of it) for an assistant reply: its end-of-turn token is that trained part. For a reply with tool calls the
        text starts at the end-of-turn token, as what precedes it depends on the arguments."""
        calls = reply.get("tool_calls")
        if not calls:
            return self._tail(next_role)
        eot, after = self._call_tail(next_role, _call_name(calls[-1]))
        return eot + after, eot

    def end_of_turn_tokens(self) -> list[str]:
        """The special tokens that end a reply: mid-conversation and final (gpt-oss: `<|end|>` and `<|return|>`).

        Token strings, not ids; empty when the template ends turns without a special token. Raises ConfigError when
        the template does not render assistant content verbatim."""
        return [eot for eot in (self._tail(None)[1], self._tail("user")[1]) if eot]

    # -------------------------------------------------------------- spans

    def trained_spans(self, messages: list[dict], tools=None) -> tuple[str, list[tuple[int, int]]]:
        """The full rendering and the character spans of it that are trained.

        Returns (text, [(start, end), ...]): half-open character offsets into text, in message order. Raises
        DataError when a reply cannot be located in the rendering (see the module docstring)."""
        full = self.render(messages, tools=tools)
        if self.base == "all":
            spans = [(0, len(full))]
            # per-message "loss": false still removes that reply
            excluded = [self._assistant_span(full, messages, i, tools) for i, m in enumerate(messages)
                        if m["role"] == "assistant" and m.get("loss") is False]
            for s, e in excluded:
                spans = [piece for a, b in spans for piece in ((a, min(b, s)), (max(a, e), b)) if piece[0] < piece[1]]
            return full, spans
        # ms-swift: a round starts at a user or tool message, so last_round trains only the final reply of an agent turn
        last_user = max((i for i, m in enumerate(messages) if m["role"] in ("user", "tool")), default=-1)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            train = m.get("loss")
            if train is None:
                train = self.base == "default" or i > last_user
            if not train:
                continue
            s, e = self._assistant_span(full, messages, i, tools)
            if self.ignore_empty_think:
                for rx in _EMPTY_THINK:
                    mt = rx.match(full, s, e)
                    if mt:
                        s = mt.end()
                        break
            if s < e:
                spans.append((s, e))
        return full, spans

    def _assistant_span(self, full: str, messages: list[dict], i: int, tools) -> tuple[int, int]:
        prompt = self.render(messages[:i], add_generation_prompt=True, tools=tools)
        if not full.startswith(prompt):
            k = next((j for j, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
            raise DataError("", None, "messages", _unaligned(i, messages, f"renders the conversation before it "
                            f"differently once later turns follow (first difference at character {k}: "
                            f"{full[max(0, k - 20):k + 20]!r})"), _UNALIGNED_FIX)
        start = len(prompt)
        calls = messages[i].get("tool_calls")
        j = i + 1
        if j < len(messages):
            nxt = messages[j]
            probe = self.render(messages[:j] + [{**nxt, "content": _SENTINEL}], tools=tools)
            c = probe.find(_SENTINEL)
            tail, eot = self._reply_tail(messages[i], nxt["role"])
            if c < 0 or probe[:c] != full[:c] or full[c - len(tail):c] != tail:
                raise DataError("", None, "messages", _unaligned(i, messages, "renders it differently once later "
                                "turns follow (next role " + repr(nxt["role"]) + ")"), _UNALIGNED_FIX)
            end = c - len(tail) + len(eot)
        else:
            tail, eot = self._reply_tail(messages[i], None)
            if not full.endswith(tail):
                raise DataError("", None, "messages", _unaligned(i, messages, "does not end the final reply "
                                "with its usual end-of-turn text"), _UNALIGNED_FIX)
            end = len(full) - len(tail) + len(eot)
        if end < start:
            raise DataError("", None, "messages", _unaligned(i, messages, "renders it as nothing"), _UNALIGNED_FIX)
        if calls:
            _check_calls_rendered(full[start:end], calls, i)
        return start, end

    # -------------------------------------------------------------- encoding

    def encode(self, record: dict, messages_key: str = "messages", truncate: bool = True) -> Encoded:
        """Token ids and labels [T] of one canonical record's `messages_key` conversation ("messages" or
        "rejected_messages"). Without a chat template the contents are joined and every token is trained.
        truncate: apply --max_length / --truncation_strategy and require a trained token.
        Raises:
            TooLong: over --max_length with strategy "delete" (args[0]: the length in tokens); only with truncate.
            NothingToTrain: no trained token left; only with truncate.
            ConfigError: the template renders no chat at all as expected (e.g. no assistant tool_calls).
            KeyError: the record has no `messages_key`.
            DataError (no source: the caller adds it): the template refuses the conversation (its
                `raise_exception`, e.g. Llama 3.1 on parallel tool calls), drops one of a reply's tool calls, or
                renders a reply so that its tokens cannot be located (e.g. gpt-oss on text next to a tool call)."""
        messages = self.with_system(record[messages_key])
        images = record_images(record, messages_key)
        if images and self.images is None:
            raise DataError("", None, _images_key(record, messages_key), f"holds {len(images)} image(s), but the "
                            "model takes text only (no vision tower), so the pictures would be left out.",
                            "train a vision-language model (e.g. Qwen/Qwen2.5-VL-7B-Instruct), or drop the images "
                            "and their <image> tags.")
        if images and not self.use_chat_template:
            raise DataError("", None, _images_key(record, messages_key), "images need the chat template, which "
                            "places them; --use_chat_template false joins text only.",
                            "drop --use_chat_template false (or the images).")
        if not self.use_chat_template:
            enc = self._plain(messages)
            return self._truncate(enc) if truncate else enc
        from jinja2 import TemplateError, TemplateSyntaxError

        try:
            full, spans = self.trained_spans(messages, record.get("tools"))
        except TemplateSyntaxError:
            raise
        except TemplateError as e:  # a row the template rejects is a bad row (file:line), not a crash
            fix = "reshape the row as the model's template expects, or drop it."
            if "has no attribute" in str(e):  # e.g. gpt-oss reads every tool's description
                fix = (f"the template reads a field this row lacks ({str(e).split('has no attribute')[-1].strip()}); "
                       f"add it — for tools, give each function a \"description\" — or drop the row.")
            raise DataError("", None, "tools" if record.get("tools") and "description" in str(e) else messages_key,
                            f"the chat template refuses this conversation: {e}", fix) from None
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [IGNORE] * len(ids)
        k = 0
        spans = sorted(spans)
        for t, (a, b) in enumerate(offsets):
            if b <= a:
                continue
            while k < len(spans) and spans[k][1] <= a:
                k += 1
            if k < len(spans) and spans[k][0] <= a < spans[k][1]:
                labels[t] = ids[t]
        ids = list(ids)
        if self.images is not None and (images or self.images.image_token_id in ids):
            ids, labels, _ = expand_images(ids, labels, images, self.images, _images_key(record, messages_key))
        enc = Encoded(ids, labels, images=list(images) or None)
        return self._truncate(enc) if truncate else enc

    def _plain(self, messages: list[dict]) -> Encoded:
        """--use_chat_template false (`tunesmith pt`): the contents joined, between the special tokens the tokenizer
        adds around a text by itself (a BOS for Llama-style tokenizers, none for Qwen's) and followed by EOS, every
        token a label — ms-swift's generation template (TemplateMeta.to_generate_template_meta, auto_add_bos)."""
        if self._around is None:  # once per encoder
            with_specials = self.tok("a")["input_ids"]
            single = self.tok("a", add_special_tokens=False)["input_ids"]
            self._around = ([], [])
            if len(single) == 1 and single[0] in with_specials:
                i = with_specials.index(single[0])
                self._around = (with_specials[:i], with_specials[i + 1:])
        before, after = self._around
        text = "".join(m["content"] for m in messages) + (self.tok.eos_token or "")
        ids = before + self.tok(text, add_special_tokens=False)["input_ids"] + after
        return Encoded(ids, list(ids))

    def _truncate(self, enc: Encoded) -> Encoded:
        n, m = len(enc.input_ids), self.max_length
        if m and n > m:
            if self.truncation == "delete":
                raise TooLong(n)
            cut = enc.input_ids[:n - m] if self.truncation == "left" else enc.input_ids[m:]
            if enc.images and self.images.image_token_id in cut:
                raise TooLong(n)  # a picture cut in part would not match its features: the row goes as too long
            if self.truncation == "left":
                enc = Encoded(enc.input_ids[-m:], enc.labels[-m:], images=enc.images)
            else:
                enc = Encoded(enc.input_ids[:m], enc.labels[:m], images=enc.images)
        if enc.n_trained == 0:
            raise NothingToTrain()
        return enc

    def encode_pair(self, record: dict) -> tuple[Encoded, Encoded]:
        """Chosen and rejected encodings of a preference record. Their prompts must tokenise identically and their
        trained completions must differ — unless the rejected side has pictures of its own (`rejected_images`),
        where either may differ; --max_length applies to each side separately (as in ms-swift).

        Raises TooLong, NothingToTrain, ConfigError as `encode`; DataError (field "rejected", no source: the caller
        adds it) when the prompts tokenise differently or the trained completions are identical."""
        chosen = self.encode(record, "messages", truncate=False)
        rejected = self.encode(record, "rejected_messages", truncate=False)
        if chosen.n_trained == 0 or rejected.n_trained == 0:
            raise NothingToTrain()
        if record_images(record, "rejected_messages") != record_images(record, "messages"):
            # the rejected side has pictures of its own (`rejected_images`): the preference may lie in them, and
            # prompts with other pictures tokenise differently, so neither check below applies
            return self._truncate(chosen), self._truncate(rejected)
        pc = next(i for i, x in enumerate(chosen.labels) if x != IGNORE)
        pr = next(i for i, x in enumerate(rejected.labels) if x != IGNORE)
        if chosen.input_ids[:pc] != rejected.input_ids[:pr]:
            raise DataError("", None, "rejected", "the chosen and rejected conversations differ before the reply "
                            "(their prompts tokenise differently).",
                            "make both share the same messages up to the final reply.")
        if [x for x in chosen.labels if x != IGNORE] == [x for x in rejected.labels if x != IGNORE]:
            raise DataError("", None, "rejected", "tokenises to the same trained reply as the chosen one, so the "
                            "pair carries no preference.", "give a different rejected reply, or drop the row.")
        return self._truncate(chosen), self._truncate(rejected)


def record_images(record: dict, messages_key: str = "messages") -> list:
    """The pictures of a record's `messages_key` conversation, in tag order: a pair's rejected side has its own
    `rejected_images` or shares `images`; [] for a text row."""
    return list(record.get(_images_key(record, messages_key)) or [])


def _images_key(record: dict, messages_key: str) -> str:
    return "rejected_images" if messages_key == "rejected_messages" and "rejected_images" in record else "images"


def image_parts(text: str) -> list[dict]:
    """A message's text with `<image>` tags (ms-swift's rows) as the content parts a vision-language chat template
    renders: [{"type": "text", "text": ...}, {"type": "image"}, ...] (empty texts left out)."""
    parts: list[dict] = []
    for i, piece in enumerate(text.split(IMAGE_TAG)):
        if i:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _call_name(call: dict) -> str:
    """The function name of a canonical (or OpenAI) tool call."""
    return str((call.get("function") or call).get("name", ""))


def _check_calls_rendered(span: str, calls: list[dict], i: int) -> None:
    """Raise DataError (no source: the caller adds it) unless the rendered reply i names each of its tool calls: a
    template that drops calls (gpt-oss's renders only the first of parallel calls) must not train a reply with
    calls missing."""
    names = [_call_name(c) for c in calls]
    for name in sorted(set(names)):
        if span.count(name) < names.count(name):
            raise DataError("", None, f"messages[{i}].tool_calls",
                            f"the chat template renders {span.count(name)} of the {names.count(name)} call(s) to "
                            f"{name!r} in this reply (it does not support parallel calls), so the row cannot be "
                            f"trained as written.", "give one call per assistant turn, each followed by its result.")


def render_highlighted(tokenizer, enc: Encoded, color: bool = False, image_token_id: Optional[int] = None) -> str:
    """The encoded row as text with the trained tokens marked: [[...]] (or green when color).

    Special tokens are kept; color wraps trained runs in ANSI green (ESC[32m ... ESC[0m) instead of brackets. A run of
    a picture's image tokens (image_token_id) shows once with its count: `<|image_pad|>×64`."""
    import re

    out, run, in_train = [], [], False
    pad = tokenizer.convert_ids_to_tokens(image_token_id) if image_token_id is not None else None

    def flush():
        """Decode the pending run of ids into `out` (marked when trained) and start a new run."""
        if not run:
            return
        text = tokenizer.decode(run, skip_special_tokens=False)
        if pad:
            text = re.sub(f"(?:{re.escape(pad)})+", lambda m: f"{pad}×{len(m.group(0)) // len(pad)}", text)
        if in_train:
            out.append(f"\x1b[32m{text}\x1b[0m" if color else f"[[{text}]]")
        else:
            out.append(text)
        run.clear()

    for tid, lab in zip(enc.input_ids, enc.labels):
        trained = lab != IGNORE
        if trained != in_train:
            flush()
            in_train = trained
        run.append(tid)
    flush()
    return "".join(out)


def encode_one(encoder: ChatEncoder, rec: dict, kind: str) -> tuple[str, Any]:
    """Encode one canonical record as a method's `rows` kind says: "sft" -> Encoded; "preference" -> (chosen,
    rejected); "kto" -> (Encoded, desirable: bool). Returns (status, value): ("ok", encoded), ("too_long", None)
    (--truncation_strategy delete), ("nothing_to_train", None) or ("bad", DataError). Raises ConfigError from the
    template (a problem with the model, not the row)."""
    try:
        if kind == "preference":
            chosen, rejected = encoder.encode_pair(rec)
            chosen.margin = rec.get("margin")
            return "ok", (chosen, rejected)
        if kind == "kto":
            return "ok", (encoder.encode(rec), bool(rec["label"]))
        enc = encoder.encode(rec)
        enc.channel, enc.tag = rec.get("channel"), rec.get("tag")
        return "ok", enc
    except TooLong:
        return "too_long", None
    except NothingToTrain:
        return "nothing_to_train", None
    except DataError as e:
        return "bad", e
