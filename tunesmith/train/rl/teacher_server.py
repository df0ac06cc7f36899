"""A distillation teacher behind a server (`--teacher_model_server`: GKD, and GRPO's OPD-RL): its log-probabilities
fetched over HTTP, as ms-swift 4.6's (rlhf_trainers/gkd_helpers.py, rollout_mixin._infer_teacher_requests,
utils.parse_prompt_logprobs; GKD asks for the top-k at every position, OPD-RL for the sampled tokens' alone).

`--teacher_model_server` is one URL (one teacher for every row) or a JSON list of {"url", "tags"} (several
teachers; each row goes to the one whose tags hold the row's `--teacher_tag_key` column, default `dataset`):
`parse_teacher_servers` and `route` are ms-swift's parse_teacher_model_server and route_samples_to_teachers, with
their errors. Each teacher gets ms-swift's request, POST /infer/ with request_config {"prompt_logprobs": k,
"max_tokens": 1, "temperature": 0.0}, the sequences sent as `prompt_token_ids` (the trainer's tokens, so every
position aligns; `tunesmith deploy` answers it: tunesmith.serve.teacher), and reads vLLM's prompt_logprobs as
parse_prompt_logprobs does: at each position after the first, the k most likely tokens' log-probabilities (nats,
temperature 1) and ids, most likely first (k = 0: the actual token's alone).

What must not live here: the loss (ops/jsd.py), the server (tunesmith.serve, which train may not import). Standard
library HTTP only; no torch import at module level.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Optional

from tunesmith.errors import ConfigError
from tunesmith.train.rl.rollout_client import API_KEY_ENV, RolloutServerError, _message, _reason


@dataclass(frozen=True)
class TeacherServer:
    """One teacher server: its base URL (no trailing slash) and the row tags it takes (empty: every row; one
    teacher only)."""
    url: str
    tags: tuple = ()


def parse_teacher_servers(value: Optional[str]) -> Optional[tuple]:
    """ms-swift's parse_teacher_model_server: None → None; a URL → (TeacherServer(url),); a JSON list of {"url",
    "tags"} → one TeacherServer each, tags as text; with several, each must have tags and no tag may appear twice.
    Raises ConfigError with ms-swift's messages (prefixed with the flag)."""
    if value is None:
        return None
    value = value.strip()
    flag = "--teacher_model_server"
    if not value.startswith("["):
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{flag} {value[:80]}: neither a URL (http://HOST:PORT) nor a JSON list of "
                              f'{{"url", "tags"}}; give one teacher\'s URL, or several as [{{"url": ..., "tags": '
                              f"[...]}}, ...]")
        return (TeacherServer(value.rstrip("/")),)
    try:
        raw = json.loads(value)
    except ValueError as e:
        raise ConfigError(f"{flag}: not valid JSON ({e}); give one URL or a JSON list of {{url, tags}}") from None
    if not isinstance(raw, list):
        raise ConfigError(f"{flag} must be a JSON list of {{url, tags}}, got {type(raw).__name__}")
    if not raw:
        raise ConfigError(f"{flag}: the JSON list is empty")
    servers = []
    for i, c in enumerate(raw):
        if not isinstance(c, dict):
            raise ConfigError(f"{flag}[{i}] must be a dict, got {type(c).__name__}")
        if not c.get("url"):
            raise ConfigError(f'{flag}[{i}]: "url" is required')
        tags = c.get("tags", [])
        if not isinstance(tags, list):
            raise ConfigError(f'{flag}[{i}]: "tags" must be a list, got {type(tags).__name__}')
        servers.append(TeacherServer(str(c["url"]).rstrip("/"), tuple(str(t) for t in tags)))
    if len(servers) > 1:
        seen: dict = {}
        for i, s in enumerate(servers):
            if not s.tags:
                raise ConfigError(f'{flag}[{i}]: "tags" must be non-empty with multiple teachers (each sample '
                                  f'routes to exactly one teacher)')
            for tag in s.tags:
                if tag in seen:
                    raise ConfigError(f'{flag}: tag "{tag}" appears in both teacher[{seen[tag]}] and teacher[{i}]; '
                                      f'tags must not overlap')
                seen[tag] = i
    return tuple(servers)


def route(tags: list, servers: tuple, tag_key: str = "dataset") -> dict:
    """ms-swift's route_samples_to_teachers: {teacher index: [row indices]} for rows with these tags (text or None).
    One teacher takes every row. Raises ConfigError for a row whose tag no teacher takes."""
    routing: dict = {i: [] for i in range(len(servers))}
    if len(servers) == 1:
        routing[0] = list(range(len(tags)))
        return routing
    owner = {tag: i for i, s in enumerate(servers) for tag in s.tags}
    for s_idx, tag in enumerate(tags):
        t_idx = owner.get(tag)
        if t_idx is None:
            missing = f"has no column {tag_key} (--teacher_tag_key)" if tag is None else f"tag {tag!r} (from " \
                f"\"{tag_key}\") matches no teacher"
            raise ConfigError(f"sample[{s_idx}] of the batch {missing}; available tags: {sorted(owner)}")
        routing[t_idx].append(s_idx)
    return routing


def tag_check(servers: tuple, key: str):
    """map_records' function that keeps a GRPO prompt whose --teacher_tag_key column one of several teacher
    servers takes, and raises DataError (its file and line) for one without the column or with another value."""
    from tunesmith.errors import DataError

    tags = sorted({t for s in servers for t in s.tags})

    def check(rec: dict, src: tuple) -> list:
        """[rec] when a teacher takes its tag; else raises DataError."""
        value = prompt_tag(rec, key)
        if value is None:
            raise DataError(src[0], src[1], "", f"has no column {key} (--teacher_tag_key), which routes each row to "
                            f"one of the teacher servers (tags {tags})", f"add {key} to every row, or name the "
                            f"routing column with --teacher_tag_key")
        if value not in tags:
            raise DataError(src[0], src[1], key, f"{value!r} matches no teacher server (tags {tags})")
        return [rec]
    return check


def prompt_tag(prompt: dict, key: str) -> Optional[str]:
    """A GRPO prompt's --teacher_tag_key column as text (None when absent): which teacher server scores it."""
    value = (prompt.get("columns") or {}).get(key)
    return None if value is None else str(value)


def parse_prompt_logprobs(prompt_logprobs: Optional[list], k: int) -> tuple[list, list]:
    """ms-swift's parse_prompt_logprobs: ([position][k] log-probs, [position][k] token ids) for positions 1..T−1 of
    vLLM's prompt_logprobs; k = 0: the actual token's (each position's first entry), else its k most likely."""
    lps, ixs = [], []
    for pos in (prompt_logprobs or [])[1:]:
        if k == 0:
            tid, info = next(iter(pos.items()))
            lps.append([info["logprob"]])
            ixs.append([int(tid)])
        else:
            items = sorted(pos.items(), key=lambda x: -x[1]["logprob"])[:k]
            lps.append([info["logprob"] for _, info in items])
            ixs.append([int(tid) for tid, _ in items])
    return lps, ixs


class TeacherClient:
    """The teacher servers of a run: `logprobs(sequences, tags, k)` fetches every sequence's per-position top-k."""

    def __init__(self, servers: tuple, tag_key: str = "dataset", timeout: float = 240.0):
        self.servers, self.tag_key, self.timeout = servers, tag_key, timeout

    def connect(self, tokenizer=None) -> None:
        """Wait until each server's /health answers (up to `timeout` seconds each; a note says what it waits for),
        then, with the student's tokenizer, check that each teacher's is the same (the vocab_size and
        tokenizer_fingerprint `tunesmith deploy` adds to GET /v1/models; a server that does not say, a vLLM one, is
        not checked). Raises ConfigError naming the address and how to start one, or the mismatch."""
        for s in self.servers:
            self._wait(s)
            if tokenizer is not None:
                self._check_tokenizer(s, tokenizer)

    def _wait(self, s: TeacherServer) -> None:
        from tunesmith.log import note

        deadline, said = time.monotonic() + self.timeout, False
        while True:
            try:
                _post(s.url, "/health", None, "GET", timeout=max(0.5, min(5.0, self.timeout)))
                return
            except RolloutServerError as e:
                if time.monotonic() >= deadline:
                    raise ConfigError(f"--teacher_model_server: no teacher server answers at {s.url} (waited "
                                      f"{self.timeout:g} s for /health; {e}). Serve the teacher first, e.g. "
                                      f"`tunesmith deploy --model TEACHER --max_logprobs K`") from None
                if not said:
                    note(f"--teacher_model_server: waiting up to {self.timeout:g} s (fixed, as ms-swift's; no flag "
                         f"changes it) for the teacher server at {s.url} to answer /health")
                    said = True
            time.sleep(0.5)

    def _check_tokenizer(self, s: TeacherServer, tokenizer) -> None:
        from tunesmith.models.identity import tokenizer_identity

        try:
            listed = _post(s.url, "/v1/models", None, "GET", timeout=60.0).get("data") or []
        except (RolloutServerError, AttributeError):
            return  # no model list: not checked here (the top-k ids are checked as they come)
        theirs = next((m for m in listed if isinstance(m, dict) and "tokenizer_fingerprint" in m), None)
        if theirs is None:
            return
        mine = tokenizer_identity(tokenizer)
        if theirs.get("vocab_size") != mine["vocab_size"]:
            why = f"its vocabulary has {theirs.get('vocab_size')} tokens, the student's {mine['vocab_size']}"
        elif theirs.get("tokenizer_fingerprint") != mine["tokenizer_fingerprint"]:
            why = "the same size, but some token ids map to other tokens"
        else:
            return
        raise ConfigError(f"--teacher_model_server: the teacher at {s.url} ({theirs.get('id')}) has another "
                          f"tokenizer than the student --model ({why}); its top-k token ids would not be the "
                          f"student's. Serve a teacher that shares the student's tokenizer")

    def logprobs(self, sequences: list, tags: list, k: int) -> list:
        """[(log-probs [T−1][k'], ids [T−1][k'])] of each token-id sequence [T], position t − 1 holding the
        distribution of token t given the tokens before it (parse_prompt_logprobs), from the teacher its tag routes
        it to. Raises ConfigError (routing) or RolloutServerError (the server's error, or no answer)."""
        out: list = [None] * len(sequences)
        for t_idx, rows in route(tags, self.servers, self.tag_key).items():
            if not rows:
                continue  # no row for this teacher: no request (ms-swift skips the empty call too)
            body = {"infer_requests": [{"messages": [{"role": "user", "content": ""}],
                                        "prompt_token_ids": list(sequences[i])} for i in rows],
                    "request_config": {"prompt_logprobs": k, "max_tokens": 1, "temperature": 0.0}}
            answers = _post(self.servers[t_idx].url, "/infer/", json.dumps(body).encode())
            if len(answers) != len(rows):
                raise RolloutServerError(f"the teacher server at {self.servers[t_idx].url} answered "
                                         f"{len(answers)} outputs for {len(rows)} requests")
            for i, a in zip(rows, answers):
                out[i] = parse_prompt_logprobs(a.get("prompt_logprobs"), k)
        return out


def _post(base: str, path: str, body: Optional[bytes], method: str = "POST", timeout: Optional[float] = None):
    """The JSON answer of one request to a teacher server (TUNESMITH_API_KEY sent as its bearer key). Raises
    RolloutServerError for an HTTP error (with the server's message; a 401/403 says to set TUNESMITH_API_KEY) or
    when nothing answers."""
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(API_KEY_ENV)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(base + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        hint = "" if e.code not in (401, 403) else (
            f" ({'a wrong API key was sent' if key else 'no API key was sent'}: set {API_KEY_ENV} to the server's "
            f"--api_key in the training process's environment)")
        raise RolloutServerError(f"the teacher server at {base} refused {path} (HTTP {e.code}): {_message(e)}{hint}",
                                 e.code) from None
    except OSError as e:
        raise RolloutServerError(f"the teacher server at {base} did not answer {path} ({_reason(e)})") from None


class ServerTeacher:
    """A teacher behind its server(s): `topk(batch, k)` gives GKD the teacher's top-k at the batch's trained
    positions, in token_logps.head_inputs' order (row-major over labels[:, 1:] != -100); `completion_logps(units,
    width)` gives OPD-RL the log-probs of GRPO completions' tokens."""

    def __init__(self, client: TeacherClient):
        self.client = client

    @property
    def describe(self) -> str:
        """The teacher, as the log header shows it."""
        urls = ", ".join(s.url + (f" (tags {', '.join(s.tags)})" if s.tags else "") for s in self.client.servers)
        return f"the teacher server(s) at {urls}: their top-k log-probs over HTTP"

    def topk(self, batch: dict, k: int):
        """(log-probs [N, k] float32, token ids [N, k] int64) of the teacher at each trained position of a padded
        batch (input_ids, attention_mask, labels [B, T]; tags [B]): each row's real tokens go to its teacher as
        they are (left or right padding dropped), and the distribution predicting token t is the server's entry
        for position t. Raises ConfigError (routing) or RolloutServerError."""
        import torch

        from tunesmith.data.encode import IGNORE

        ids, labels = batch["input_ids"], batch["labels"]
        mask = batch.get("attention_mask")
        seqs, offsets = [], []
        for i in range(ids.shape[0]):
            keep = mask[i].bool() if mask is not None else torch.ones_like(ids[i], dtype=torch.bool)
            real = keep.nonzero().flatten()
            offsets.append(int(real[0]) if real.numel() else 0)
            seqs.append(ids[i][keep].tolist())
        fetched = self.client.logprobs(seqs, list(batch.get("tags") or [None] * len(seqs)), k)
        b, t = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
        at = [(bi, ti + 1 - offsets[bi] - 1) for bi, ti in zip(b.tolist(), t.tolist())]
        values = torch.tensor([fetched[bi][0][u] for bi, u in at], dtype=torch.float32).reshape(len(at), k)
        indices = torch.tensor([fetched[bi][1][u] for bi, u in at], dtype=torch.long).reshape(len(at), k)
        return values, indices

    def completion_logps(self, units: list, width: int):
        """OPD-RL: the teacher's log-probabilities [B, width] (CPU float32; 0 past each completion) of each unit's
        completion tokens (train/rl/units.Unit) after its teacher view (its teacher_prompt_ids, else its prompt),
        the actual tokens' (prompt_logprobs 0, as ms-swift's GRPO API teacher: temperature 1). Raises ConfigError
        (routing) or RolloutServerError."""
        import torch

        views = [list(u.teacher_prompt_ids or u.prompt_ids) for u in units]
        fetched = self.client.logprobs([v + list(u.completion_ids) for v, u in zip(views, units)],
                                       [u.tag for u in units], 0)
        out = torch.zeros(len(units), width, dtype=torch.float32)
        for i, (view, u) in enumerate(zip(views, units)):
            lps = fetched[i][0][len(view) - 1:len(view) - 1 + len(u.completion_ids)]
            out[i, :len(lps)] = torch.tensor([x[0] for x in lps], dtype=torch.float32)
        return out
