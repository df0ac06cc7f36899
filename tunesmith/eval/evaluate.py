"""`tunesmith eval`: benchmarks from local files (benchmarks.py), the base and the tuned model side by side.

One run evaluates every model under test on every --eval_dataset:
- a local model (--model, with --adapters: the base with the adapter switched off, then the tuned model; or
  --base_model as the base), or any OpenAI-compatible endpoint (--eval_url, e.g. `tunesmith deploy`);
- multiple choice is scored by the likelihood of each option letter for local models (one forward pass per
  question, nothing to parse), by generation plus answer extraction for endpoints (or --mcq_scoring generation);
- gsm8k, general_qa and humaneval generate (greedy unless --temperature / --eval_generation_config say otherwise).

Outputs (<eval_output_dir>/<time>/): predictions/<model>/<dataset>.jsonl (one line per sample),
reports/<model>/<dataset>.json, summary.json and summary.md (the table: dataset, subset, metric, n, each model,
delta ± its standard error), and comparison.png when two models are compared. With --report_to, the same scores
also go to the trackers (logging.jsonl, runs/ for TensorBoard, SwanLab, W&B, MLflow).
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

from tunesmith.eval import benchmarks as B
from tunesmith.errors import ConfigError

BINARY = {"acc", "exact_match", "exact_match_strict", "exact_match_flexible", "pass@1"}
CORPUS = {"bleu", "chrf"}  # corpus-level: no per-sample standard error
DEFAULT_NEW_TOKENS = {"mcq": 256, "math": 512, "qa": 512, "code": 512}


# ------------------------------------------------------------------ models under test

_MARK = "\u00a7ANSWER\u00a7"


def answer_prefix(encoder, messages: list[dict]) -> str:
    """The text before the first token of a final answer, as the chat template renders one: the generation prompt
    plus whatever the template puts before an answer (Qwen3's empty `<think></think>`, gpt-oss's final-channel
    header). Scoring option letters after the bare generation prompt would score `<think>` or `<|channel|>`."""
    text = encoder.render(encoder.with_system(messages + [{"role": "assistant", "content": _MARK}]))
    k = text.find(_MARK)
    return text[:k] if k >= 0 else encoder.render(encoder.with_system(messages), add_generation_prompt=True)

class LocalModel:
    """A loaded model (through infer.ChatEngine, the one generation path); `adapter_off` evaluates the base weights of
    a PeftModel without loading them twice."""

    def __init__(self, engine, label: str, describe: str, adapter_off: bool = False, batch_size: int = 8):
        self.engine, self.label, self.describe = engine, label, describe
        self.adapter_off, self.batch_size = adapter_off, max(1, batch_size)

    def _context(self):
        return self.engine.model.disable_adapter() if self.adapter_off else contextlib.nullcontext()

    def option_logps(self, conversations: list[list[dict]], letters: list[list[str]]) -> list[dict]:
        """log p(first token of each option letter) as the answer's first token, for each conversation."""
        import torch

        tok = self.engine.tok
        letter_ids: dict[str, int] = {}
        for opts in letters:
            for k in opts:
                if k not in letter_ids:
                    ids = tok(k, add_special_tokens=False)["input_ids"]
                    letter_ids[k] = ids[0]
        if len(set(letter_ids.values())) != len(letter_ids):
            raise ConfigError("this tokenizer gives two option letters the same first token; use --mcq_scoring "
                              "generation")
        out = []
        model, pad = self.engine.model, tok.pad_token_id if tok.pad_token_id is not None else 0
        with self._context(), torch.no_grad():
            for i in range(0, len(conversations), self.batch_size):
                prompts = [tok(answer_prefix(self.engine.encoder, c), add_special_tokens=False)["input_ids"]
                           for c in conversations[i:i + self.batch_size]]
                longest = max(len(p) for p in prompts)
                ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], device=self.engine.device)
                mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts],
                                    device=self.engine.device)
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1].float()
                logps = torch.log_softmax(logits, -1).cpu()
                for row, opts in zip(logps, letters[i:i + self.batch_size]):
                    out.append({k: float(row[letter_ids[k]]) for k in opts})
        return out

    def generate(self, conversations: list[list[dict]], gen) -> list[str]:
        """Replies in order. Every conversation is queued at once: the engine batches them (continuous batching,
        --max_batch_size rows in flight); the base is the same weights with the adapter off for those rows."""
        from tqdm.auto import tqdm

        gen = dataclasses.replace(gen, n=1)
        adapter = "" if self.adapter_off else None
        prompts = [self.engine.prompt(c) for c in conversations]
        handles = [self.engine.submit(p, gen, adapter)[0] for p in prompts]
        replies = []
        with tqdm(total=len(conversations), desc=f"generate ({self.label})", disable=None, leave=False) as bar:
            for h, p in zip(handles, prompts):
                reply = self.engine.reply(h.result(), p, gen)
                if reply.error is not None:
                    raise reply.error
                replies.append(reply.content)
                bar.update(1)
        return replies


class Endpoint:
    """An OpenAI-compatible chat endpoint (--eval_url), queried --eval_num_proc requests at a time."""

    def __init__(self, url: str, model: Optional[str], api_key: Optional[str], num_proc: int, timeout: float = 600):
        base = url.rstrip("/")
        for suffix in ("/chat/completions", "/completions"):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
        self.base, self.api_key, self.num_proc, self.timeout = base, api_key, max(1, num_proc), timeout
        self.model = model or self._first_model()
        self.label, self.describe = self.model, f"{self.model} at {self.base}"

    def _request(self, path: str, body: Optional[dict] = None) -> dict:
        import urllib.error
        import urllib.request

        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, headers=headers,
                                     method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:300]
            raise ConfigError(f"--eval_url {self.base}{path}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ConfigError(f"--eval_url {self.base}: cannot connect ({getattr(e, 'reason', e)}); is the server "
                              f"running? (tunesmith deploy ... prints its address)") from None

    def _first_model(self) -> str:
        models = self._request("/models").get("data") or []
        if not models:
            raise ConfigError(f"--eval_url {self.base}: /models lists no model; pass the name with --model")
        return models[0]["id"]

    def option_logps(self, conversations, letters):
        raise ConfigError("an endpoint is scored by generation (--mcq_scoring generation)")

    def generate(self, conversations: list[list[dict]], gen) -> list[str]:
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        def one(messages):
            body = {"model": self.model, "messages": messages, "max_tokens": gen.max_new_tokens,
                    "temperature": gen.temperature if gen.temperature is not None else 0.0}
            for k in ("top_p", "top_k", "repetition_penalty", "seed"):
                if getattr(gen, k, None) is not None:
                    body[k] = getattr(gen, k)
            if gen.stop:
                body["stop"] = list(gen.stop)
            reply = self._request("/chat/completions", body)
            return reply["choices"][0]["message"].get("content") or ""

        with ThreadPoolExecutor(self.num_proc) as pool:
            return list(tqdm(pool.map(one, conversations), total=len(conversations), desc=f"requests ({self.label})",
                             disable=None, leave=False))


# ------------------------------------------------------------------ one dataset

@dataclass
class Task:
    name: str
    bench: B.Benchmark
    samples: list
    shots: dict
    options: dict


def _conversation(task: Task, s: B.Sample) -> list[dict]:
    if task.bench.kind == "mcq":
        text = B.mcq_prompt(s, task.bench.language, task.shots.get(s.subset, []))
    elif task.bench.kind == "math":
        text = B.gsm8k_prompt(s, task.shots.get("*", []))
    elif "messages" in s.extra:
        return [dict(m) for m in s.extra["messages"]]
    else:
        text = s.question
    system = s.extra.get("system")
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def run_task(task: Task, runner, mcq_scoring: str, gen, timeout: float, num_proc: int) -> tuple[list[dict], str]:
    """Score every sample of one dataset with one model. Returns (per-sample records, how it was scored)."""
    kind = task.bench.kind
    convs = [_conversation(task, s) for s in task.samples]
    records = []
    if kind == "mcq" and mcq_scoring == "likelihood":
        scoring = "likelihood of each option letter as the reply's first token"
        for s, lp, conv in zip(task.samples, runner.option_logps(convs, [s.choices for s in task.samples]), convs):
            pred = max(lp, key=lp.get)
            records.append({"prediction": pred, "option_logps": {k: round(v, 5) for k, v in lp.items()},
                            "metrics": {"acc": float(pred == s.answer)}})
    else:
        gen = gen.merged(max_new_tokens=gen.max_new_tokens or DEFAULT_NEW_TOKENS[kind])
        replies = runner.generate(convs, gen)
        scoring = "generation, then answer extraction"
        if kind == "mcq":
            for s, r in zip(task.samples, replies):
                pred = B.mcq_extract(r, s.choices)
                records.append({"response": r, "prediction": pred, "metrics": {"acc": float(pred == s.answer)}})
        elif kind == "math":
            for s, r in zip(task.samples, replies):
                ext = B.gsm8k_extract(r)
                records.append({"response": r, "prediction": ext, "metrics": {
                    "exact_match_strict": float(ext["strict"] == s.answer),
                    "exact_match_flexible": float(ext["flexible"] == s.answer)}})
        elif kind == "qa":
            scoring = "generation, compared with the reference (exact match, BLEU, ROUGE-L, chrF)"
            for s, r in zip(task.samples, replies):
                records.append({"response": r, "prediction": r, "metrics": B.qa_sample_metrics(r, s.answer)})
        else:  # code
            from concurrent.futures import ThreadPoolExecutor

            scoring = f"generation, then the tests run in a subprocess ({timeout:g} s limit)"
            programs = [B.humaneval_program(s, r) for s, r in zip(task.samples, replies)]
            with ThreadPoolExecutor(max(1, min(num_proc, os.cpu_count() or 1))) as pool:
                results = list(pool.map(lambda p: B.run_program(p, timeout), programs))
            for r, (ok, why) in zip(replies, results):
                records.append({"response": r, "prediction": why, "metrics": {"pass@1": float(ok)}})
    for s, rec, conv in zip(task.samples, records, convs):
        rec.update({"subset": s.subset, "source": s.source, "gold": s.answer, "prompt": conv[-1]["content"]})
    return records, scoring


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _se(metric: str, xs: list[float]) -> Optional[float]:
    n = len(xs)
    if metric in CORPUS or n == 0:
        return None
    if metric in BINARY:
        return B.binomial_se(_mean(xs), n)
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / max(n - 1, 1) / n)


def aggregate(task: Task, records: list[dict]) -> dict:
    """{subset: {"n", "metrics": {metric: {"score", "se"}}}}, plus "all" when there are several subsets."""
    def block(recs: list[dict], samples: list) -> dict:
        metrics = {}
        for name in recs[0]["metrics"]:
            xs = [r["metrics"][name] for r in recs]
            metrics[name] = {"score": _mean(xs), "se": _se(name, xs)}
        if task.bench.kind == "qa":
            for name, value in B.qa_corpus_metrics([r["response"] for r in recs],
                                                   [s.answer for s in samples]).items():
                metrics[name] = {"score": value, "se": None}
        return {"n": len(recs), "metrics": metrics}

    subsets: dict[str, list[int]] = {}
    for i, s in enumerate(task.samples):
        subsets.setdefault(s.subset, []).append(i)
    out = {sub: block([records[i] for i in idx], [task.samples[i] for i in idx]) for sub, idx in subsets.items()}
    if len(subsets) > 1:
        out["all"] = block(records, task.samples)
    return out


# ------------------------------------------------------------------ the table

def summary_rows(tasks: list[Task], results: dict) -> list[dict]:
    """One row per dataset × subset × metric; with two models, the paired delta and its standard error."""
    labels = list(results)
    rows = []
    for task in tasks:
        agg = {m: results[m][task.name]["aggregate"] for m in labels}
        first = agg[labels[0]]
        subsets = (["all"] if "all" in first else []) + [s for s in first if s != "all"]
        for sub in subsets:
            for metric in first[sub]["metrics"]:
                row = {"dataset": task.name, "subset": sub, "metric": metric, "n": first[sub]["n"],
                       "scores": {m: agg[m][sub]["metrics"][metric]["score"] for m in labels},
                       "se": {m: agg[m][sub]["metrics"][metric]["se"] for m in labels}}
                if len(labels) == 2:
                    a, b = labels
                    row["delta"] = row["scores"][b] - row["scores"][a]
                    row["delta_se"] = None
                    if metric not in CORPUS:
                        pick = [i for i, s in enumerate(task.samples) if sub == "all" or s.subset == sub]
                        xa = [results[a][task.name]["records"][i]["metrics"][metric] for i in pick]
                        xb = [results[b][task.name]["records"][i]["metrics"][metric] for i in pick]
                        row["delta_se"] = B.paired_se(xa, xb)
                rows.append(row)
    return rows


def _pct(x: Optional[float]) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def markdown_table(rows: list[dict], labels: list[str], describe: dict) -> str:
    head = ["dataset", "subset", "metric", "n"] + labels
    if len(labels) == 2:
        head.append("delta ± SE")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["dataset"], r["subset"], r["metric"], str(r["n"])]
        for m in labels:
            se = r["se"][m]
            cells.append(_pct(r["scores"][m]) + (f" ± {_pct(se)}" if se is not None and not math.isnan(se) else ""))
        if len(labels) == 2:
            d, se = r["delta"], r["delta_se"]
            text = f"{100 * d:+.1f}"
            if se is not None and not math.isnan(se):
                # a paired SE of 0 with a nonzero delta: every sample moved the same way (a sign test agrees)
                text += f" ± {100 * se:.1f}" + (" *" if abs(d) > 2 * se and d != 0 else "")
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", "Scores in %, ± one standard error (binomial for accuracies; BLEU and chrF are corpus-level)."]
    if len(labels) == 2:
        notes.append("delta = " + f"{labels[1]} − {labels[0]}, paired over the same samples; * marks |delta| > 2 SE "
                                  "(unlikely to be noise).")
    notes += [f"- {m}: {describe[m]}" for m in labels]
    return "\n".join(lines + notes) + "\n"


def comparison_chart(rows: list[dict], labels: list[str]) -> bytes:
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["subset"] == "all" or not any(x["dataset"] == r["dataset"] and x["subset"] == "all"
                                                                 for x in rows)]
    names = [f"{r['dataset']}\n{r['subset']}\n{r['metric']}" for r in shown]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(shown) + 2), 4))
    width = 0.8 / len(labels)
    for k, m in enumerate(labels):
        xs = [i + (k - (len(labels) - 1) / 2) * width for i in range(len(shown))]
        ses = [100 * (r["se"][m] or 0) for r in shown]
        ax.bar(xs, [100 * r["scores"][m] for r in shown], width, yerr=ses, capsize=3, label=m)
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("score (%)")
    ax.set_title("base vs tuned")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# ------------------------------------------------------------------ the command

def _gen_config(args):
    from tunesmith.inference.chat import GenConfig

    gen = GenConfig.from_args(args)
    cfg = dict(args.eval_generation_config or {})
    mapping = {"max_tokens": "max_new_tokens", "max_new_tokens": "max_new_tokens", "temperature": "temperature",
               "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repetition_penalty", "seed": "seed",
               "stop": "stop"}
    overrides = {}
    for k, v in cfg.items():
        if k == "do_sample":
            if not v:
                overrides["temperature"] = 0.0
            continue
        if k not in mapping:
            near = difflib.get_close_matches(k, list(mapping) + ["do_sample"], n=1)
            raise ConfigError(f"--eval_generation_config: unknown key {k!r}"
                              + (f"; did you mean {near[0]!r}?" if near else ""))
        overrides[mapping[k]] = list(v) if k == "stop" else v
    gen = gen.merged(**overrides)
    if gen.temperature is None:
        gen = gen.merged(temperature=0.0)  # ms-swift's eval default: greedy
    return gen


def load_tasks(args) -> list[Task]:
    """Every dataset's samples, read (and checked) before any model is loaded."""
    if not args.eval_dataset:
        raise ConfigError(f"--eval_dataset: name at least one benchmark ({', '.join(B.BENCHMARKS)})")
    ds_args = args.eval_dataset_args or {}
    for key in ds_args:
        if key not in args.eval_dataset:
            raise ConfigError(f"--eval_dataset_args: {key!r} is not in --eval_dataset ({' '.join(args.eval_dataset)})")
    tasks = []
    for name in args.eval_dataset:
        if name not in B.BENCHMARKS:
            near = difflib.get_close_matches(name, list(B.BENCHMARKS), n=1)
            raise ConfigError(f"--eval_dataset {name}: unknown benchmark"
                              + (f"; did you mean {near[0]}?" if near else "") + f" (one of {', '.join(B.BENCHMARKS)})")
        opts = dict(ds_args.get(name) or {})
        known = {"local_path", "subset_list", "few_shot_num", "timeout", "language"}
        for k in opts:
            if k not in known:
                raise ConfigError(f"--eval_dataset_args {name}: unknown key {k!r} (known: {', '.join(sorted(known))})")
        path = opts.get("local_path")
        if path:
            samples = B.LOADERS[name](os.path.expanduser(path))
        elif name == "humaneval":
            samples = B.load_humaneval(None)
        else:
            samples = B.load_from_hub(name)
        if opts.get("subset_list"):
            wanted = list(opts["subset_list"])
            have = sorted({s.subset for s in samples})
            missing = [w for w in wanted if w not in have]
            if missing:
                raise ConfigError(f"--eval_dataset_args {name}: subset {missing[0]!r} not found (have: "
                                  f"{', '.join(have[:20])}{' …' if len(have) > 20 else ''})")
            samples = [s for s in samples if s.subset in wanted]
        if args.eval_limit:  # per subset, the first N (as EvalScope's --limit)
            seen: dict[str, int] = {}
            kept = []
            for s in samples:
                if seen.get(s.subset, 0) < args.eval_limit:
                    kept.append(s)
                    seen[s.subset] = seen.get(s.subset, 0) + 1
            samples = kept
        bench = B.BENCHMARKS[name]
        if opts.get("language"):
            bench = B.Benchmark(bench.name, bench.kind, opts["language"], bench.hub)
        shots = B.load_shots(name, path, int(opts.get("few_shot_num") or 0))
        tasks.append(Task(name, bench, samples, shots, opts))
    if any(t.bench.kind == "code" for t in tasks) and not args.allow_code_execution:
        raise ConfigError("humaneval runs the code the model writes. Pass --allow_code_execution true to run it "
                          "(each program in its own subprocess with a time limit, 2 GiB of memory and no stdin), "
                          "ideally inside a container")
    return tasks


