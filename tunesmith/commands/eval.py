"""`tunesmith eval`: run benchmarks from local files on the base and the tuned model (or an endpoint), side by side, and write the tables, charts and per-sample reports."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any
from tunesmith.errors import ConfigError
from tunesmith.eval.evaluate import (LocalModel, Endpoint, run_task, aggregate, summary_rows, markdown_table, comparison_chart, _gen_config, load_tasks)


def _runners(args):
    """(the models under test in table order — base and tuned when there is a base to compare with —, the
    checkpoint whose args.json was read, the command resolved from it: a new frozen one, see
    models.checkpoint.resolve_checkpoint). The base's command is made from the tuned model's resolved one."""
    from tunesmith.inference.chat import build_engine

    if args.eval_url:
        return [Endpoint(args.eval_url, args.model, args.api_key, args.eval_num_proc)], None, args
    engine, args, ckpt, _ = build_engine(args)
    bs = args.max_batch_size if args.max_batch_size > 0 else 64
    tuned_name = ", ".join(args.adapters) if args.adapters else args.model
    if args.base_model:
        base_args = dataclasses.replace(args, model=args.base_model, adapters=[], ckpt_dir=None)
        base_engine = build_engine(base_args)[0]
        return [LocalModel(base_engine, "base", args.base_model, batch_size=bs),
                LocalModel(engine, "tuned", tuned_name, batch_size=bs)], ckpt, args
    if args.adapters and args.compare_base:
        # the base is the same weights with the adapter off: peft's adapter switch locally, no LoRA request on
        # vLLM/SGLang/LMDeploy (a second engine would not fit next to the first on one GPU)
        if hasattr(engine.model, "disable_adapter") or args.infer_backend not in ("transformers", "pt"):
            base = LocalModel(engine, "base", f"{args.model} (the adapter switched off)", adapter_off=True,
                              batch_size=bs)
        else:  # several adapters were merged in sequence: the base needs its own copy
            base_args = dataclasses.replace(args, adapters=[], ckpt_dir=None)
            base = LocalModel(build_engine(base_args)[0], "base", args.model, batch_size=bs)
        return [base, LocalModel(engine, "tuned", tuned_name, batch_size=bs)], ckpt, args
    return [LocalModel(engine, "model", tuned_name, batch_size=bs)], ckpt, args


def main(args):
    """`tunesmith eval`: the benchmarks on the model(s) or endpoint; writes the tables, charts and per-sample
    reports. Returns {output_dir, rows, results, labels}. Raises FlagError (flag values, before anything loads) or
    ConfigError."""
    from tunesmith.data.load import write_jsonl
    from tunesmith.files import write_text_atomic
    from tunesmith.inference.flags import check_inference_flags

    check_inference_flags(args)

    if args.eval_backend != "Native":
        raise ConfigError(f"--eval_backend {args.eval_backend}: tunesmith evaluates natively (--eval_backend Native); "
                          f"OpenCompass and VLMEvalKit are not wired in")
    if args.extra_eval_args:
        raise ConfigError("--extra_eval_args is for EvalScope's backends, which tunesmith does not use")
    if args.eval_url and (args.adapters or args.base_model):
        raise ConfigError("--eval_url evaluates the served model; --adapters/--base_model are for local models "
                          "(serve the adapter with tunesmith deploy --adapters NAME=PATH and pass --model NAME)")
    if args.mcq_scoring == "likelihood" and args.eval_url:
        raise ConfigError("--mcq_scoring likelihood needs the model's logits; an endpoint is scored by generation")
    tasks = load_tasks(args)
    gen = _gen_config(args)
    mcq_scoring = args.mcq_scoring or ("generation" if args.eval_url else "likelihood")
    runners, ckpt, args = _runners(args)
    out_dir = args.eval_output_dir or os.path.join(ckpt or ".", "eval_output")
    out_dir = os.path.join(out_dir, time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out_dir, exist_ok=True)
    print(f"[tunesmith] eval: {', '.join(f'{t.name} ({len(t.samples)})' for t in tasks)}; models: "
          f"{'; '.join(f'{r.label} = {r.describe}' for r in runners)}; output {out_dir}", file=sys.stderr, flush=True)
    results: dict[str, dict] = {}
    for runner in runners:
        results[runner.label] = {}
        for task in tasks:
            records, scoring = run_task(task, runner, mcq_scoring, gen, float(task.options.get("timeout", 10)),
                                        args.eval_num_proc)
            agg = aggregate(task, records)
            results[runner.label][task.name] = {"records": records, "aggregate": agg, "scoring": scoring}
            write_jsonl(os.path.join(out_dir, "predictions", runner.label, f"{task.name}.jsonl"),
                        [{"index": i, **r} for i, r in enumerate(records)])
            report = {"dataset": task.name, "model": runner.label, "model_describe": runner.describe,
                      "scoring": scoring, "n": len(records), "subsets": agg}
            write_text_atomic(os.path.join(_mkdir(out_dir, "reports", runner.label), f"{task.name}.json"),
                              json.dumps(_clean(report), ensure_ascii=False, indent=2))
    labels = [r.label for r in runners]
    describe = {r.label: r.describe for r in runners}
    rows = summary_rows(tasks, results)
    table = markdown_table(rows, labels, describe)
    scoring = {t.name: results[labels[0]][t.name]["scoring"] for t in tasks}
    table += "".join(f"- {name}: scored by {how}\n" for name, how in scoring.items())
    write_text_atomic(os.path.join(out_dir, "summary.md"), table)
    write_text_atomic(os.path.join(out_dir, "summary.json"), json.dumps(
        _clean({"models": describe, "scoring": scoring, "rows": rows}), ensure_ascii=False, indent=2))
    if len(labels) > 1:
        png = comparison_chart(rows, labels)
        tmp = os.path.join(out_dir, f"comparison.png.tmp-{os.getpid()}")
        with open(tmp, "wb") as fh:
            fh.write(png)
        os.replace(tmp, os.path.join(out_dir, "comparison.png"))
    report_scores(args, out_dir, rows, labels)
    print(table + f"\nresults: {out_dir}", flush=True)
    return {"output_dir": out_dir, "rows": rows, "results": results, "labels": labels}


def tracker_metrics(rows: list[dict]) -> dict:
    """The score table as tracker scalars: `eval/<dataset>/<subset>/<metric>/<model label>` for each model's score
    and `.../delta` (second model minus first) when two are compared. Scores are fractions (0..1), as in
    summary.json; NaN ones are dropped by the trackers."""
    out = {}
    for r in rows:
        key = f"eval/{r['dataset']}/{r['subset']}/{r['metric']}"
        out.update({f"{key}/{label}": score for label, score in r["scores"].items()})
        if "delta" in r:
            out[f"{key}/delta"] = r["delta"]
    return out


def report_scores(args, out_dir: str, rows: list[dict], labels: list[str]) -> None:
    """--report_to: the score table to the trackers training uses (track.Trackers: logging.jsonl, TensorBoard under
    out_dir/runs, SwanLab, W&B, MLflow), at step 0. The config they get is args.json's record, so tokens arrive
    redacted; SwanLab's key is handed to its SDK in memory only. A tracker that fails warns and the eval still
    succeeds (its files are already written)."""
    names = [n.lower() for n in args.report_to or []]
    if not [n for n in names if n != "none"]:
        return  # the default: no logging.jsonl or runs/ appear in the eval folder
    from tunesmith.config.parser import to_record
    from tunesmith.runs.track import Trackers

    trackers = Trackers(out_dir, args.report_to, {**to_record(args), "models": labels}, args)
    try:
        trackers.log(tracker_metrics(rows), step=0)
    finally:
        trackers.close()


def _mkdir(*parts) -> str:
    path = os.path.join(*parts)
    os.makedirs(path, exist_ok=True)
    return path


def _clean(x: Any):
    """NaN (a standard error of one sample) as null: the JSON files stay valid JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x
