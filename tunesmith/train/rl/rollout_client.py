"""GRPO's rollouts from a rollout server (`--use_vllm true --vllm_mode server`): the trainer's side of the protocol
that `tunesmith rollout` serves (tunesmith.serve.rollout; ms-swift's `swift rollout` endpoint names and shapes).

Before each round the policy's LoRA adapter goes to the server over HTTP (POST /update_adapter/, one safetensors
body: tunesmith.inference.live_adapters) — only when its weights changed since the last push — and the round is
sampled through POST /infer/ with that adapter version named, every prompt as the token ids the trainer trains on
and with the same per-completion seeds as the colocated engine, so a round sampled by the server equals the one
the trainer's own engine would sample. A `swift rollout` or `trl vllm-serve` vLLM server syncs weights over NCCL
only; it is recognised by /get_engine_type/ and refused with the reason.

What must not live here: the rounds themselves (train/rl/rollouts.py), the server (tunesmith.serve, which train
may not import). Standard library HTTP only (no requests dependency). No torch import at module level.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Optional

from tunesmith.errors import ConfigError, TunesmithError

API_KEY_ENV = "TUNESMITH_API_KEY"  # the server's --api_key, read from the environment (never logged)


class RolloutServerError(TunesmithError):
    """The rollout server answered a request with an error (`status`: its HTTP status), or the connection broke
    mid-run (status None)."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServerConfig:
    """Where the rollout server is: base_url (http://HOST:PORT, no trailing slash) and timeout, the seconds to
    wait for its /health/ to answer (--vllm_server_timeout)."""
    base_url: str
    timeout: float

    @classmethod
    def from_flags(cls, base_urls: list, hosts: list, ports: list, timeout: float) -> "ServerConfig":
        """From --vllm_server_base_url, or --vllm_server_host and --vllm_server_port (one server; checked by
        grpo._vllm_problems)."""
        if base_urls:
            return cls(str(base_urls[0]).rstrip("/"), float(timeout))
        host = str(hosts[0])
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return cls(f"http://{host}:{int(ports[0])}", float(timeout))


class RolloutServer:
    """A connection to one rollout server for a policy (a peft PeftModel with its "default" adapter)."""

    def __init__(self, cfg: ServerConfig, model, model_dir: Optional[str] = None):
        self.cfg, self.model, self.model_dir = cfg, model, model_dir
        self.adapter: Optional[str] = None  # the server's name of the version last pushed
        self.pushes = 0
        self._pushed: Optional[dict] = None  # CPU copies of the LoRA tensors last pushed
        self._full: Optional[tuple] = None  # the Rollouts.weights whose full weights were pushed last

    def start_command(self) -> str:
        """The command that starts a server for this model at this address (for error messages)."""
        host, _, port = self.cfg.base_url.split("://", 1)[-1].rpartition(":")
        return f"tunesmith rollout --model {self.model_dir or 'MODEL'} --host {host.strip('[]')} --port {port}"

    def connect(self) -> dict:
        """Wait until /health/ answers (up to cfg.timeout seconds, polling), then check with /get_engine_type/ that
        it is a tunesmith rollout server. Returns its engine description. Raises ConfigError naming the address
        and the command that starts one, or why a vLLM server cannot serve this run."""
        from tunesmith.log import note

        deadline, last = time.monotonic() + self.cfg.timeout, None
        while True:
            try:
                self._once("GET", "/health/", timeout=max(0.5, min(5.0, self.cfg.timeout)))
                break
            except RolloutServerError as e:
                if last is None and time.monotonic() < deadline:
                    note(f"--vllm_mode server: waiting up to {self.cfg.timeout:g} s (--vllm_server_timeout) for the "
                         f"rollout server at {self.cfg.base_url} to answer /health/")
                last = e.__context__ or e
            if time.monotonic() >= deadline:
                raise ConfigError(f"--vllm_mode server: no rollout server answers at {self.cfg.base_url} (waited "
                                  f"{self.cfg.timeout:g} s for /health/, --vllm_server_timeout; last: "
                                  f"{_reason(last)}). Start one first, e.g. `{self.start_command()}`, and pass its "
                                  f"--vllm_server_host/--vllm_server_port (or --vllm_server_base_url)") from None
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        info = self._check_engine()
        self._check_model(info)
        return info

    def _check_engine(self) -> dict:
        try:
            info = self._request("POST", "/get_engine_type/")
        except RolloutServerError as e:
            if e.status in (401, 403):  # a server started with --api_key: the trainer must send it
                raise ConfigError(f"--vllm_mode server: the rollout server at {self.cfg.base_url} needs an API key "
                                  f"({'a wrong one was sent' if os.environ.get(API_KEY_ENV) else 'none was sent'}): "
                                  f"set {API_KEY_ENV} to the server's --api_key in the training process's "
                                  f"environment") from None
            info = {"error": str(e)}
        if info.get("server") != "tunesmith":
            kind = info.get("engine_type", "no /get_engine_type/")
            raise ConfigError(f"--vllm_mode server: {self.cfg.base_url} is not a tunesmith rollout server (engine "
                              f"{kind}: a `swift rollout` or `trl vllm-serve` vLLM server). Those take the "
                              f"policy's weights only over NCCL between GPUs, which tunesmith's GRPO does not drive "
                              f"yet, so every round would sample stale weights. Serve the model with "
                              f"`{self.start_command()}` (the policy's adapter goes over HTTP), or use --vllm_mode "
                              f"colocate")
        return info

    def _check_model(self, info: dict) -> None:
        """Refuse a server that serves another base model than the policy's (GET /get_model_info/: config fields,
        and for a LoRA policy a weight fingerprint; tunesmith.models.identity). A server without the endpoint (an
        older tunesmith) gets a note. Raises ConfigError naming both models."""
        from tunesmith.log import note
        from tunesmith.models.identity import identity_difference, model_identity

        if self.model is None:
            return
        try:
            theirs = self._request("GET", "/get_model_info/")
        except RolloutServerError as e:
            if e.status not in (404, 405):
                raise
            note(f"--vllm_mode server: the rollout server at {self.cfg.base_url} does not say which model it serves "
                 f"(no /get_model_info/: an older tunesmith); make sure it serves this run's --model "
                 f"{self.model_dir or ''}".rstrip())
            return
        lora = isinstance(getattr(self.model, "peft_config", None), dict)
        mine = model_identity(self.model)
        if not lora:  # full weights: the trainer's (resumed) weights replace the server's at the first push
            mine.pop("fingerprint", None)
        why = identity_difference(mine, theirs)
        if why:
            raise ConfigError(f"--vllm_mode server: the rollout server at {self.cfg.base_url} serves "
                              f"{theirs.get('model') or info.get('model')}, another model than this run's --model "
                              f"{self.model_dir or 'MODEL'} ({why}); the policy's adapter would be trained on one "
                              f"base and sampled on the other. Start the server with `{self.start_command()}`")

    def sync(self, weights: Optional[tuple] = None) -> Optional[str]:
        """Bring the server to the policy's weights: a LoRA policy's adapter when its tensors differ from the last
        push (the first call always pushes); a fully trained policy's trainable weights when `weights` (the state
        the rounds are on: Rollouts.weights) differs from the last push's. Returns the server's name of the adapter
        version to sample (None for full weights). Raises RolloutServerError."""
        import torch

        from tunesmith.inference.live_adapters import pack_adapter, policy_adapter

        if not isinstance(getattr(self.model, "peft_config", None), dict):
            if weights is None or weights != self._full:
                self._push_params()
                self._full = weights
            return None
        config, tensors = policy_adapter(self.model)
        if self._pushed is not None and self._pushed.keys() == tensors.keys() and \
                all(torch.equal(self._pushed[k], v) for k, v in tensors.items()):
            return self.adapter
        body = pack_adapter(config, tensors)
        answer = self._request("POST", "/update_adapter/", body, "application/octet-stream")
        self.adapter, self.pushes = answer["adapter"], self.pushes + 1
        self._pushed = {k: v.clone() for k, v in tensors.items()}
        return self.adapter

    BUCKET_BYTES = 512 << 20  # full weights go in bodies of about this size (a large model never in one)

    def _push_params(self) -> None:
        """POST the policy's trainable parameters to /update_params/, in safetensors bodies of ~BUCKET_BYTES."""
        from safetensors.torch import save

        bucket, size = {}, 0
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue  # frozen weights never change
            bucket[name] = p.detach().to("cpu").contiguous()
            size += p.numel() * p.element_size()
            if size >= self.BUCKET_BYTES:
                self._request("POST", "/update_params/", save(bucket), "application/octet-stream", timeout=None)
                bucket, size = {}, 0
        if bucket:
            self._request("POST", "/update_params/", save(bucket), "application/octet-stream", timeout=None)
        self.pushes += 1

    def generate(self, prompts: list, sampling: dict, n: int, adapter: Optional[str] = "current") -> list:
        """n completions of each prompt, in order: prompts [(token ids, first seed, messages)] — completion k of a
        prompt is sampled with seed + k — and sampling: RequestConfig fields (max_tokens, temperature, top_p, top_k,
        repetition_penalty; None for the model's default; logprobs true: each completion's per-token log-probs of the
        distribution it was sampled from). adapter: the server's name of the adapter version to
        sample ("current": the one last pushed; None: none, full weights). Returns engine Completions (token ids
        with the stop token, as the engine's). Raises RolloutServerError."""
        from tunesmith.inference.engine import Completion, TokenLogprob

        adapter = self.adapter if adapter == "current" else adapter
        body = {"infer_requests": [{"messages": m, "prompt_token_ids": list(ids), "seed": s} for ids, s, m in prompts],
                "request_config": {**sampling, "n": n, "return_details": True},
                "adapter_request": {"name": adapter} if adapter else None}
        try:
            outputs = self._request("POST", "/infer/", json.dumps(body).encode(), timeout=None)
        except RolloutServerError as e:
            if "is not loaded here" not in str(e):
                raise
            # the server lost the version (restarted, or another trainer's upload dropped it): push it again
            self._pushed = None
            body["adapter_request"] = {"name": self.sync(self._full)}
            outputs = self._request("POST", "/infer/", json.dumps(body).encode(), timeout=None)
        if len(outputs) != len(prompts):
            raise RolloutServerError(f"{self.cfg.base_url}/infer/ answered {len(outputs)} outputs for "
                                     f"{len(prompts)} requests")
        out = []
        for (ids, _, _), o in zip(prompts, outputs):
            for c in o["response"]["choices"]:
                logprobs = [TokenLogprob(t, e["logprob"]) for t, e in zip(c["token_ids"], c["logprobs"]["content"])] \
                    if sampling.get("logprobs") and c.get("logprobs") else None
                out.append(Completion(list(c["token_ids"]), c["finish_reason"] or "stop", len(ids), logprobs))
        return out

    def _request(self, method: str, path: str, body: Optional[bytes] = None, content_type: str = "application/json",
                 timeout: Optional[float] = 60.0):
        """The JSON answer of one request (timeout: seconds, None for no limit). When nothing answers (the server
        died or restarts), waits for its /health/ up to --vllm_server_timeout (one note says so) and sends the
        request once more. Raises RolloutServerError for an HTTP error (with the server's message) or when nothing
        answers then."""
        try:
            return self._once(method, path, body, content_type, timeout)
        except RolloutServerError as e:
            if e.status is not None or not self._back(e):
                raise
        return self._once(method, path, body, content_type, timeout)

    def _back(self, error: RolloutServerError) -> bool:
        """Whether the server's /health/ answers again within --vllm_server_timeout (polling; one note first)."""
        from tunesmith.log import note

        note(f"the rollout server at {self.cfg.base_url} stopped answering ({error}); waiting up to "
             f"{self.cfg.timeout:g} s (--vllm_server_timeout) for it to answer /health/ again")
        deadline = time.monotonic() + self.cfg.timeout
        while True:
            try:
                self._once("GET", "/health/", timeout=max(0.5, min(5.0, self.cfg.timeout)))
                return True
            except RolloutServerError:
                if time.monotonic() >= deadline:
                    return False
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def _once(self, method: str, path: str, body: Optional[bytes] = None, content_type: str = "application/json",
              timeout: Optional[float] = 60.0):
        """One request's JSON answer, no retry (`_request`'s)."""
        headers = {"Content-Type": content_type}
        key = os.environ.get(API_KEY_ENV)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.cfg.base_url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            raise RolloutServerError(f"the rollout server at {self.cfg.base_url} refused {path} (HTTP {e.code}): "
                                     f"{_message(e)}", e.code) from None
        except OSError as e:  # refused, reset, timed out: the server is not there (any more)
            raise RolloutServerError(f"the rollout server at {self.cfg.base_url} did not answer {path} "
                                     f"({_reason(e)}); is `{self.start_command()}` still running?") from None


def _message(e) -> str:
    """The error message of an HTTP error body (deploy's {"error": {"message"}} or FastAPI's {"detail"})."""
    try:
        body = json.load(e)
    except (ValueError, OSError):
        return e.reason if isinstance(e.reason, str) else "no message"
    if isinstance(body, dict):
        err = body.get("error")
        return (err.get("message") if isinstance(err, dict) else None) or str(body.get("detail", body))[:500]
    return str(body)[:500]


def _reason(error) -> str:
    """A connection failure in a few words (urllib's URLError wraps the socket's)."""
    inner = getattr(error, "reason", None) or error
    return f"{type(inner).__name__}: {inner}" if inner is not None else "no answer"


def server_config(args):
    """--use_vllm true --vllm_mode server: where the rollout server is (rollout_client.ServerConfig), else None."""
    wanted = args.use_vllm and args.vllm_mode == "server"
    if not wanted or not (args.vllm_server_base_url or args.vllm_server_host):
        return None
    return ServerConfig.from_flags(list(args.vllm_server_base_url), list(args.vllm_server_host),
                                   list(args.vllm_server_port), args.vllm_server_timeout)


def async_problems(args, problems: list) -> None:
    """--async_generate true: ms-swift's rule, a rollout server (--use_vllm true --vllm_mode server)."""
    if args.async_generate and not (args.use_vllm and args.vllm_mode == "server"):
        problems.append("--async_generate true needs --use_vllm true --vllm_mode server: the next round is sampled "
                        "by a rollout server (`tunesmith rollout`) while this one trains; add them (with "
                        "--vllm_server_host/--vllm_server_port), or drop --async_generate")


def server_problems(args, problems: list) -> None:
    """--vllm_mode server: one rollout server, a LoRA or fully trained policy (its adapter, or its trainable
    weights, go over HTTP), one process."""
    drop = "or drop --use_vllm (tunesmith's own batched engine in the training process generates the rollouts)"
    start = "`tunesmith rollout --model MODEL --port 8000`"
    urls, hosts, ports = args.vllm_server_base_url, args.vllm_server_host, args.vllm_server_port
    if not urls and not hosts:
        problems.append(f"--vllm_mode server needs the rollout server's --vllm_server_host and --vllm_server_port "
                        f"(or --vllm_server_base_url); start one with {start}, {drop}")
    if len(urls) > 1 or len(hosts) > 1 or len(ports) > 1:
        problems.append("--vllm_mode server: one rollout server is supported yet (several hosts, ports or URLs "
                        "were given); pass one")
    for url in urls:
        from urllib.parse import urlsplit

        parts = urlsplit(str(url))
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/") or parts.query:
            problems.append(f"--vllm_server_base_url {url}: the server's root, http://HOST:PORT (no path), e.g. "
                            f"http://127.0.0.1:8000")
    for port in ports:
        if not 1 <= int(port) <= 65535:
            problems.append(f"--vllm_server_port {port}: a TCP port, 1 to 65535")
    if not args.vllm_server_timeout > 0:
        problems.append(f"--vllm_server_timeout {args.vllm_server_timeout}: seconds, more than 0")
    if args.train_type not in ("lora", "full"):
        problems.append(f"--vllm_mode server with --train_type {args.train_type}: the policy reaches the rollout "
                        f"server as its LoRA adapter (--train_type lora) or as its full weights (--train_type "
                        f"full); other tuners' weights are not synced to a server yet; {drop}")
    if args.async_generate and args.multi_turn_scheduler:  # ms-swift's rlhf_args refuses the pair too
        problems.append("--async_generate true with --multi_turn_scheduler: asynchronous rounds are not supported "
                        "with multi-turn rollouts (nor in ms-swift); drop one")
    if args.multi_turn_scheduler:
        problems.append(f"--vllm_mode server with --multi_turn_scheduler {args.multi_turn_scheduler}: multi-turn "
                        f"rollouts run in the training process, not on a rollout server, yet; {drop}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        problems.append(f"--vllm_mode server under torchrun ({os.environ['WORLD_SIZE']} processes): one training "
                        f"process per rollout server is supported yet; run one process, {drop}")
