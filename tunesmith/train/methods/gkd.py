"""The GKD method (`tunesmith rlhf --rlhf_type gkd`): Generalized Knowledge Distillation (Agarwal et al. 2024, "On-Policy
Distillation of Language Models: Learning from Self-Generated Mistakes", arXiv:2306.13649), with ms-swift's flags
and defaults: the student learns the teacher's next-token distribution over the whole vocabulary at every reply
token, on the dataset's replies and on its own samples.

Each optimiser step, as ms-swift's GKDTrainer:
1. On-policy or not: random.Random(--seed + the step).random() <= --lmbda (ms-swift's `_get_random_num`: the same
   draw on every process, and on a resumed run). On-policy, each row's reply is replaced by the student's own
   completion of its prompt (everything before the reply), sampled through tunesmith's generation engine with the
   current weights at --temperature (--top_p, --top_k, --repetition_penalty), at most --max_completion_length
   tokens, each row with its own seed (from --seed, the step, the micro-batch and the process).
2. The teacher's last hidden states at the reply tokens, without gradient (train/reference.py `setup_teacher`: a
   frozen model, the model with the LoRA adapter switched off, or the student itself).
3. The loss of each micro-batch, as ms-swift's: the generalised JSD (--beta) at --temperature, averaged over its
   reply tokens (ops/jsd.py: chunked, never [tokens × vocabulary] for either model), plus --sft_alpha × the mean
   NLL of the dataset's reply on steps that are not on-policy. The loop averages over the step's micro-batches.

Not here: the divergence and its gradient (ops/jsd.py), the teacher (reference.py), the engine's sampling
(tunesmith.inference), the teacher server's client (train/rl/teacher_server.py: with --teacher_model_server the
teacher is its top --gkd_logits_topk log-probs at every reply token, fetched over HTTP, and the divergence ms-swift's
top-k one), the teacher's own DeepSpeed engine with --teacher_deepspeed (distributed.teacher_engine; ops/jsd.py
gathers its ZeRO-3-partitioned output layer). ms-swift's seq_kd (the teacher generates) is deprecated and
unimplemented there too; its on-policy self-distillation prompts (`teacher_prompt`) are not supported yet.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Optional

from tunesmith.config.checks import between
from tunesmith.data.collate import pad_collate
from tunesmith.data.encode import IGNORE, Encoded
from tunesmith.errors import ConfigError
from tunesmith.log import note
from tunesmith.train import loop
from tunesmith.train.interrupts import raise_sampling_errors
from tunesmith.train.rl.teacher_server import (ServerTeacher, TeacherClient, parse_teacher_servers,
                                               tag_check)
from tunesmith.train.setup import Batches


def reply_start(labels: list) -> int:
    """Where a row's last trained span (its final reply) starts: everything before it is the prompt the student
    completes on-policy (earlier trained turns, with --loss_scale default, stay trained as they are)."""
    i = len(labels)
    while i > 0 and labels[i - 1] == IGNORE:
        i -= 1
    while i > 0 and labels[i - 1] != IGNORE:
        i -= 1
    return i


def gkd_collate(rows: list[Encoded], pad_id: int, padding_side: str = "right") -> dict:
    """SFT's padded batch of the rows, plus `prefixes`: each row's (input ids, labels) before its final reply,
    what an on-policy step completes."""
    batch = pad_collate(rows, pad_id, padding_side)
    batch["prefixes"] = [(list(r.input_ids[:k]), list(r.labels[:k]))
                         for r in rows for k in [reply_start(r.labels)]]
    batch["tags"] = [r.tag for r in rows]  # --teacher_tag_key's value of each row (a teacher server list routes by it)
    return batch


class OnPolicy:
    """GKD's on-policy side: which steps train on the student's own completions (`on_policy`), and those
    completions (`sampled_batch`). A loop hook (loop.Objective.hooks): it follows the optimiser step, from which
    every draw and seed derives, so a resumed run samples what the uninterrupted one did and nothing needs
    saving. `sampled` counts the completions generated (both phases), `log_path` is --log_completions' file."""

    def __init__(self, method: "GKD", model, tokenizer, cfg):
        self.method, self.model, self.tok = method, model, tokenizer
        self.seed, self.system = cfg.optim.seed, cfg.data.system
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.padding_side = cfg.data.padding_side
        self.batch_size = max(cfg.optim.per_device_train_batch_size, cfg.optim.per_device_eval_batch_size)
        self.step, self.calls, self.sampled = 0, {}, 0
        self.chat = None   # the generation engine, built at the first on-policy step (the model is placed by then)
        self.log_path: Optional[str] = None
        self.trackers = None  # the run's trackers with --log_completions (the W&B table), else None

    def begin(self, model, step: int) -> None:
        """The run starts (or resumes) at optimiser step `step`."""
        self.step, self.calls = step, {}

    def after_step(self, model, step: int) -> None:
        """Step `step` is done: the next draws are the next step's."""
        self.step, self.calls = step, {}

    def save(self, path: str) -> None:
        """Nothing to save: the draws and seeds follow from --seed and the step, which the checkpoint holds."""

    def load(self, path: str) -> None:
        """Nothing to load (see `save`)."""

    def log_to(self, run_dir: str, trackers=None) -> None:
        """--log_completions: append each on-policy completion to run_dir/completions.jsonl, and hand it to the
        run's trackers (runs.track.Trackers: W&B's completions table at the next logging step, as ms-swift)."""
        if self.method.log_completions:
            self.log_path, self.trackers = os.path.join(run_dir, "completions.jsonl"), trackers

    def on_policy(self) -> bool:
        """Whether this step trains on the student's own completions: ms-swift's draw, random.Random(--seed +
        the optimiser steps done).random() <= --lmbda (never at --lmbda 0)."""
        lmbda = self.method.lmbda
        return lmbda > 0 and random.Random(self.seed + self.step).random() <= lmbda

    def sampled_batch(self, batch: dict, training: bool) -> tuple[dict, dict]:
        """(the batch with each row's final reply replaced by the student's completion of its prefix, statistics)
        on the batch's device. Each row is sampled with its own seed from (--seed, the step, training or
        evaluation, the micro-batch within the step, the process), the model in eval mode meanwhile. Raises
        NonFiniteSampling when the student's probabilities hold inf/NaN, or the engine's error."""
        from tunesmith.inference.chat import GenConfig
        from tunesmith.log import is_main, rank
        from tunesmith.train.microbatches import to_device

        m, phase = self.method, "train" if training else "eval"
        k = self.calls[phase] = self.calls.get(phase, -1) + 1
        base = random.Random(f"{self.seed}/{self.step}/{phase}/{k}/{rank()}").randrange(2 ** 31)
        chat = self._engine()
        gen = GenConfig(max_new_tokens=m.max_completion_length, temperature=m.temperature, top_p=m.top_p,
                        top_k=m.top_k, repetition_penalty=m.repetition_penalty, seed=base)
        prefixes = batch["prefixes"]
        done = self._generate(chat, [ids for ids, _ in prefixes], gen)
        rows = [Encoded(ids + list(c.token_ids), labels + list(c.token_ids), tag=tag)
                for (ids, labels), c, tag in zip(prefixes, done, batch["tags"])]
        self.sampled += len(rows)
        if self.log_path and is_main() and training:
            self._log(prefixes, done)
        new = to_device(gkd_collate(rows, self.pad_id, self.padding_side), batch["input_ids"].device)
        return new, {"completions": len(done), "completion_tokens": sum(len(c.token_ids) for c in done)}

    def _engine(self):
        from tunesmith.inference.chat import ChatEngine

        if self.chat is None:
            self.chat = ChatEngine(self.model, self.tok, system=self.system, max_batch_size=self.batch_size)
        return self.chat

    def _generate(self, chat, prompts: list, gen) -> list:
        """The engine's completions of `prompts` (token ids), all submitted at once, row i with seed base + i."""
        training = self.model.training
        if training:  # once for the batch, not at each decoding step (the engine's rule)
            self.model.eval()
        try:
            handles = [chat.engine.submit(ids, chat.sampling(gen, i)) for i, ids in enumerate(prompts)]
            done = [h.result() for h in handles]
        finally:
            if training:
                self.model.train()
        raise_sampling_errors(done, "student")
        return done

    def _log(self, prefixes: list, done: list) -> None:
        rows = [{"prompt": self.tok.decode(ids), "completion": self.tok.decode(c.token_ids, skip_special_tokens=True)}
                for (ids, _), c in zip(prefixes, done)]
        with open(self.log_path, "a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps({"step": self.step + 1, **row}, ensure_ascii=False) + "\n")
        if self.trackers is not None:
            self.trackers.hold_completions(rows, latest_round=False)


@dataclass
class Distillation:
    """What a GKD run trains against: the teacher (reference.Reference) and the on-policy sampler."""
    teacher: Any
    sampler: OnPolicy

    @property
    def describe(self) -> str:
        """The teacher, as the log header shows it."""
        return self.teacher.describe


def teacher_head(model, batch: dict):
    """The teacher's `token_logps.HeadInputs` of a batch, detached from its module (an offloaded teacher moves
    back to the CPU while these stay on the device)."""
    from tunesmith.train.ops.token_logps import head_inputs

    h = head_inputs(model, batch)
    # a weight ZeRO-3 partitions (--teacher_deepspeed) stays the parameter (frozen): ops/jsd.py gathers it
    keep = h.weight is None or hasattr(h.weight, "ds_id")
    return replace(h, hidden=h.hidden.detach(), weight=h.weight if keep else h.weight.detach())


def gkd_loss(method: "GKD", run: Distillation, model, batch: dict) -> tuple[dict, dict]:
    """({"micro_batches": this micro-batch's loss}, summed statistics): the generalised JSD between the student and
    the teacher at --temperature, averaged over the reply tokens (plus --sft_alpha × their mean NLL when the step
    is not on-policy), on the dataset's replies or, on an on-policy step, on the student's own completions."""
    import torch

    from tunesmith.train.ops.jsd import JSDSpec, chunked_jsd
    from tunesmith.train.ops.token_logps import head_inputs

    on_policy = run.sampler.on_policy()
    stats = {"micro_batches": 1, "on_policy": int(on_policy)}
    if on_policy:
        batch, sampled = run.sampler.sampled_batch(batch, torch.is_grad_enabled())
        stats.update(sampled)
    spec = JSDSpec(method.beta, method.temperature, method.topk, 0.0 if on_policy else method.sft_alpha)
    if isinstance(run.teacher, ServerTeacher):  # its top-k log-probs over HTTP (--teacher_model_server)
        from tunesmith.train.ops.jsd import chunked_topk_jsd

        values, indices = run.teacher.topk(batch, method.topk)
        total, jsd, nll = chunked_topk_jsd(head_inputs(model, batch), values, indices, spec)
    else:
        teacher = run.teacher.token_logps(model, batch, teacher_head)  # before the student's forward (adapters)
        total, jsd, nll = chunked_jsd(head_inputs(model, batch), teacher, spec)
    sft = spec.nll_weight
    n = jsd.numel()
    stats.update({"tokens": n, "jsd": float(jsd.sum())})
    if sft:
        stats.update({"nll": float(nll.sum()), "nll_tokens": n})
    return {"micro_batches": total / max(n, 1)}, stats


def gkd_metrics(st: dict) -> dict:
    """jsd (per reply token, the divergence alone), on_policy (the share of micro-batches trained on the
    student's own completions), completions/mean_length (tokens) when there were any, sft_loss (the mean NLL of the
    dataset's reply tokens) with --sft_alpha."""
    out = {"jsd": loop.signif(st.get("jsd", 0.0) / max(st.get("tokens", 0), 1)),
           "on_policy": round(st.get("on_policy", 0) / max(st.get("micro_batches", 0), 1), 4)}
    if st.get("completions"):
        out["completions/mean_length"] = round(st["completion_tokens"] / st["completions"], 2)
    if st.get("nll_tokens"):
        out["sft_loss"] = round(st["nll"] / st["nll_tokens"], 6)
    return out


def _count(batch: dict) -> dict:
    return {"micro_batches": 1}


@dataclass(frozen=True)
class GKD:
    """GKD on the dataset's conversations (their final reply, or the student's own), against a teacher."""
    beta: float
    lmbda: float
    temperature: float
    max_completion_length: int
    sft_alpha: float = 0.0
    topk: Optional[int] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    teacher_model: Optional[str] = None
    teacher_adapters: tuple = ()
    teacher_revision: Optional[str] = None
    offload_teacher: bool = False
    log_completions: bool = False
    teacher_servers: Optional[tuple] = None   # --teacher_model_server: teacher_server.TeacherServer each, else None
    teacher_tag_key: str = "dataset"          # the row column that routes a row to one of several teacher servers
    teacher_deepspeed: Optional[str] = None   # --teacher_deepspeed: the teacher's own DeepSpeed config (spec)
    name = "gkd"
    head = "causal_lm"
    rows = "sft"
    default_loss_scale = "last_round"  # ms-swift's for gkd
    needs_reference = False            # the teacher is set up by `batches` (reference.setup_teacher)

    @classmethod
    def from_args(cls, args, problems: list) -> "GKD":
        """GKD's flags with ms-swift's defaults (β 0.5), checked; problems are appended."""
        beta = 0.5 if args.beta is None else args.beta
        between(problems, "beta", beta, 0, 1)
        between(problems, "lmbda", args.lmbda, 0, 1)
        between(problems, "temperature", args.temperature, 0, None, lo_open=True)
        between(problems, "max_completion_length", args.max_completion_length, 1, None)
        between(problems, "sft_alpha", args.sft_alpha, 0, None)
        if args.gkd_logits_topk is not None:
            between(problems, "gkd_logits_topk", args.gkd_logits_topk, 1, None)
        if args.top_p is not None:
            between(problems, "top_p", args.top_p, 0, 1, lo_open=True)
        _gkd_problems(args, problems)
        return cls(beta, args.lmbda, args.temperature, args.max_completion_length, args.sft_alpha,
                   args.gkd_logits_topk, args.top_p, args.top_k, args.repetition_penalty, args.teacher_model,
                   tuple(args.teacher_adapters), args.teacher_model_revision, args.offload_teacher_model,
                   args.log_completions, _teacher_servers(args, problems), args.teacher_tag_key,
                   args.teacher_deepspeed)

    @property
    def rows_key(self) -> str:
        """What the rows' encoding depends on beyond the row kind (the data cache's key): the routing column when
        several teacher servers route rows by it (each row carries its value as its `tag`)."""
        return f"tag={self.teacher_tag_key}" if self.teacher_servers and len(self.teacher_servers) > 1 else ""

    def resolved_flags(self) -> dict:
        """β as resolved (ms-swift's GKD default 0.5), for args.json."""
        return {"beta": self.beta, "rpo_alpha": None}

    def shape_records(self, loaded):
        """Rows as loaded: any SFT row (its final reply is what is distilled); with several teacher servers each
        row's --teacher_tag_key column (text; None when absent) becomes its routing `tag`."""
        if not self.rows_key:
            return loaded
        from tunesmith.data.load import map_records

        key, check = self.teacher_tag_key, tag_check(self.teacher_servers, self.teacher_tag_key)

        def tagged(rec: dict, src: tuple) -> list:
            """The record with its routing tag (its columns dropped: nothing else reads them). Raises DataError
            for a row without the column, or whose value no teacher takes (tag_check)."""
            check(rec, src)
            return [{**rec, "tag": str(rec.pop("columns")[key])}]
        return map_records(loaded, tagged)

    def batches(self, cfg, prepared, model, reference) -> Batches:
        """Padded batches of the encoded rows with their prompts (`gkd_collate`), the teacher and the on-policy
        sampler; dropout off (TRL's and ms-swift's default for GKD). Raises ConfigError for a vision-language
        model or a teacher that does not fit (reference.setup_teacher)."""
        from tunesmith.train.reference import disable_dropout, setup_teacher

        if prepared.encoder.images is not None:
            raise ConfigError("--rlhf_type gkd on a vision-language model is not supported yet (the student's "
                              "samples would need the pictures); distil a text model")
        if self.teacher_servers:  # its top-k over HTTP; waits for each server's /health
            client = TeacherClient(self.teacher_servers, self.teacher_tag_key)
            client.connect(prepared.tokenizer)
            teacher = ServerTeacher(client)
        else:
            teacher = setup_teacher(cfg.model, self.teacher_model, list(self.teacher_adapters),
                                    self.teacher_revision, self.offload_teacher, model, prepared.tokenizer,
                                    self._teacher_wrap(cfg))
        disable_dropout(model, has_reference=False)
        sampler = OnPolicy(self, model, prepared.tokenizer, cfg)
        collate = partial(gkd_collate, pad_id=sampler.pad_id, padding_side=cfg.data.padding_side)
        return Batches(prepared.train_rows, prepared.eval_rows, collate, Distillation(teacher, sampler),
                       on_run_dir=sampler.log_to, hooks=(sampler,))

    def _teacher_wrap(self, cfg):
        """--teacher_deepspeed: the function that wraps the loaded teacher in its DeepSpeed engine
        (distributed.teacher_engine, "auto" values from the optimisation slice), else None."""
        if not self.teacher_deepspeed:
            return None
        from tunesmith.train import distributed as D

        return partial(D.teacher_engine, spec=self.teacher_deepspeed, optim=cfg.optim, world=D.world_size())

    def objective(self, reference: Distillation, cfg) -> loop.Objective:
        """The generalised JSD per reply token, averaged over the step's micro-batches (ms-swift's per-batch
        mean), logging jsd, on_policy, completions/mean_length and sft_loss."""
        return loop.Objective("gkd", loss=partial(gkd_loss, self, reference), count=_count, metrics=gkd_metrics)

    def header(self, prepared, batches) -> str:
        """The run's header lines: the divergence, the on-policy share, the teacher, the rows."""
        loss = f"generalised JSD (β={self.beta:g}) at temperature {self.temperature:g}"
        if self.topk:
            loss += f" over the teacher's top {self.topk} tokens"
        if self.sft_alpha:
            loss += f" + {self.sft_alpha:g}·NLL of the dataset's reply (logged as sft_loss)"
        stats = prepared.data_stats
        return (f"[tunesmith] rlhf gkd: loss = {loss}; lmbda {self.lmbda:g}: that share of the steps trains on "
                f"the student's own completions (at most {self.max_completion_length} tokens)\n"
                f"[tunesmith] teacher: {batches.reference.describe}\n"
                f"[tunesmith] {stats['train_rows']} training rows, {stats['val_rows']} validation rows")


def _gkd_problems(args, problems: list) -> None:
    """What GKD cannot run with, each one problem; flags of other methods that change nothing here, a note."""
    from tunesmith.train.config import _zero3

    if args.teacher_adapters and args.teacher_model is None:
        problems.append("--teacher_adapters needs --teacher_model, the model they were trained on (without "
                        "--teacher_model the teacher is the student itself)")
    if args.teacher_model is None and args.teacher_model_server is None and not args.sft_alpha:
        problems.append("--rlhf_type gkd without --teacher_model is ms-swift's self-distillation: the teacher is "
                        "the student itself, so the divergence is 0 and nothing is learned (its on-policy "
                        "self-distillation, a `teacher_prompt` column, is not supported yet). Pass --teacher_model "
                        "(with LoRA, --teacher_model equal to --model is the model with the adapter switched off)")
    if args.packing or args.padding_free:
        problems.append("--packing/--padding_free: GKD rebuilds each batch from the rows' prompts on on-policy "
                        "steps, padded; drop the flag")
    if args.async_generate:  # ms-swift's rlhf_args: "async_generate is not supported for GKD"
        problems.append("--async_generate true with --rlhf_type gkd: asynchronous rounds are GRPO's (--vllm_mode "
                        "server), ms-swift does not support them for GKD either; drop the flag")
    if args.use_vllm:
        problems.append("--use_vllm with --rlhf_type gkd is not supported yet: the student's samples come from "
                        "tunesmith's own engine; drop --use_vllm")
    if args.fsdp or _zero3(args.deepspeed):
        problems.append("GKD with --fsdp or DeepSpeed ZeRO-3 is not supported yet (the student samples with its "
                        "whole weights on each process); use DDP or --deepspeed zero2")
    if args.teacher_deepspeed:
        _teacher_deepspeed_problems(args, problems)
    ignored = [f"--{k}" for k, v in (("loss_type", args.loss_type), ("ref_model", args.ref_model),
                                     ("ref_adapters", args.ref_adapters), ("reward_funcs", args.reward_funcs),
                                     ("steps_per_generation", args.steps_per_generation),
                                     ("generation_batch_size", args.generation_batch_size)) if v]
    if ignored:
        note(f"--rlhf_type gkd: {', '.join(ignored)} change nothing here (GKD's loss is the generalised JSD to "
             f"--teacher_model; it samples once per micro-batch of an on-policy step)")


def _teacher_deepspeed_problems(args, problems: list) -> None:
    """--teacher_deepspeed's rules: ms-swift applies it only when the student runs under DeepSpeed (its trainer
    reads it only then), to a separate --teacher_model; a teacher server or --offload_teacher_model (which moves
    the whole teacher) cannot be sharded; the value must be a preset, a JSON file or a JSON string."""
    from tunesmith.train.distributed import DEEPSPEED_PRESETS, deepspeed_spec_problem

    spec = args.teacher_deepspeed
    if not args.deepspeed:
        problems.append("--teacher_deepspeed needs --deepspeed (the student under DeepSpeed, e.g. --deepspeed zero2; "
                        "ms-swift reads the teacher's config only then); add it, or drop --teacher_deepspeed")
    if args.teacher_model is None and args.teacher_model_server is None:
        problems.append("--teacher_deepspeed needs --teacher_model: it shards a separate teacher model (the "
                        "student itself has nothing to shard)")
    if args.teacher_model_server is not None:
        problems.append("--teacher_deepspeed with --teacher_model_server: the teacher runs in its own server, not "
                        "in this run; drop --teacher_deepspeed")
    if args.offload_teacher_model:
        problems.append("--offload_teacher_model with --teacher_deepspeed: DeepSpeed places the teacher's "
                        "partitions itself; for a teacher in CPU memory use --teacher_deepspeed zero3_offload")
    if not (spec.replace("default-", "") in DEEPSPEED_PRESETS or os.path.isfile(spec)
            or spec.lstrip().startswith("{")):
        problems.append(deepspeed_spec_problem(spec, "--teacher_deepspeed"))


def _teacher_servers(args, problems: list) -> Optional[tuple]:
    """--teacher_model_server parsed (teacher_server.parse_teacher_servers) and checked by ms-swift's rules
    (arguments/rlhf_args.py `_check_teacher`, `_check_gkd`): not with --teacher_model, and --gkd_logits_topk
    required (a server answers top-k log-probs only); None without it."""
    if args.teacher_model_server is None:
        return None
    if args.teacher_model is not None:
        problems.append("setting both --teacher_model and --teacher_model_server is not supported (ms-swift's "
                        "rule); give one")
    if args.gkd_logits_topk is None:
        problems.append("--gkd_logits_topk is required when using --teacher_model_server (a teacher server "
                        "answers its top-k log-probs only), e.g. --gkd_logits_topk 20 (at most the server's "
                        "--max_logprobs)")
    try:
        return parse_teacher_servers(args.teacher_model_server)
    except ConfigError as e:
        problems.append(str(e))
        return None
