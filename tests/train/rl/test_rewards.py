"""Reward functions (tunesmith.train.rl.rewards): ms-swift's built-ins on hand-made cases, ms-swift plugin files (3.x and
4.x imports, sync and async), TRL-style module.func names and built-ins, scoring (kwargs, None → NaN) and the
errors a user sees."""
import importlib.util
import math
import sys
import textwrap

import pytest

from tunesmith.train.rl import rewards as R
from tunesmith.errors import ConfigError

SWIFT_INSTALLED = importlib.util.find_spec("swift") is not None
needs_no_swift = pytest.mark.skipif(SWIFT_INSTALLED, reason="tests tunesmith's stand-in for a missing ms-swift")


@pytest.fixture(autouse=True)
def _own_registry(monkeypatch):
    """Each test registers plugins into its own copy of the registry."""
    monkeypatch.setattr(R, "orms", dict(R.orms))


@pytest.fixture
def fallback(monkeypatch):
    monkeypatch.setattr(R, "accuracy_backend", lambda: "fallback")


def write(path, text):
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def one(name, args=None, plugins=()):
    (fn,) = R.load_reward_functions([name], list(plugins), args or R.RewardArgs())
    return fn


# ------------------------------------------------------------------ built-ins (ms-swift names)

def test_format():
    comps = ["<think>a\nb</think>\n<answer>42</answer>",
             "<think>a</think><answer>42</answer>",
             "<think>a</think><answer>42</answer>\n",       # trailing text (even a newline) is not allowed
             "<answer>42</answer>",
             "<think>a</think> so <answer>42</answer>",    # only whitespace between the blocks
             "x<think>a</think><answer>42</answer>"]
    assert one("format")(comps) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_react_format():
    comps = ["<think>plan</think>\nAction: search\nAction Input: {\"q\": 1}", "Action: search\nAction Input: x"]
    assert one("react_format")(comps) == [1.0, 0.0]


@pytest.mark.parametrize("completion, solution, expected", [
    (r"<think>...</think><answer>\boxed{1,000}</answer>", "1000", 1.0),   # thousands separator
    (r"so the answer is 3/4", r"\frac{3}{4}", 1.0),                      # fraction forms
    (r"\boxed{0.5}", r"$\dfrac{1}{2}$", 1.0),                             # decimal vs fraction
    (r"The final answer is \boxed{\frac{2}{4}}.", "0.5", 1.0),
    (r"\boxed{x + 1}", r"\boxed{x+1}", 1.0),                              # normalised strings
    (r"first \boxed{3} then \boxed{7}", "7", 1.0),                        # the last box counts
    (r"Natalia sold 48 + 24 = 72 clips.", "48/2 = 24 ... #### 72", 1.0),  # final number (GSM8K style)
    ("<answer>B</answer>", "B", 1.0),
    (r"\boxed{8}", "7", 0.0),
    ("I do not know", "7", 0.0),                                          # no answer in the completion
    (r"\boxed{7}", "", 0.0),                                              # no answer in the solution: 0 (ms-swift)
])
def test_accuracy_fallback(fallback, completion, solution, expected):
    assert one("accuracy")([completion], solution=[solution]) == [expected]


def test_accuracy_backend_reports_what_is_used():
    assert R.accuracy_backend() == ("math_verify" if importlib.util.find_spec("math_verify") else "fallback")


@pytest.mark.skipif(importlib.util.find_spec("math_verify") is None, reason="math_verify not installed")
def test_accuracy_math_verify():
    comps = [r"<answer>\boxed{\frac{3}{4}}</answer>", r"It is $\boxed{0.75}$", r"\boxed{1}", "no idea"]
    assert one("accuracy")(comps, solution=["$0.75$"] * 4) == [1.0, 1.0, 0.0, 0.0]


def test_accuracy_needs_solution():
    with pytest.raises(ConfigError, match="'solution' column"):
        one("accuracy")(["x"])


def cosine(t, T, at_zero, at_max):
    """The cosine schedule written out: at_zero at t = 0, at_max at t = T."""
    return at_max + (at_zero - at_max) * (1 + math.cos(math.pi * t / T)) / 2


def test_cosine(fallback):
    args = R.RewardArgs(cosine_max_len=10)
    comps = [r"\boxed{4}"] * 3 + [r"\boxed{5}"] * 3 + [r"\boxed{4}"]
    ids = [[], [0] * 5, [0] * 10, [], [0] * 5, [0] * 10, [[0, 0], [0]]]  # the last: a multi-turn completion
    got = one("cosine", args)(comps, solution=["4"] * 7, response_token_ids=ids)
    assert got == pytest.approx([1.0, 0.75, 0.5, -0.5, -0.25, 0.0, cosine(3, 10, 1.0, 0.5)])
    assert got[:6] == pytest.approx([cosine(t, 10, 1.0, 0.5) for t in (0, 5, 10)]
                                    + [cosine(t, 10, -0.5, 0.0) for t in (0, 5, 10)])


def test_cosine_defaults_to_max_completion_length(fallback):
    args = R.RewardArgs(max_completion_length=20, cosine_min_len_value_correct=2.0, cosine_max_len_value_correct=1.0)
    got = one("cosine", args)([r"\boxed{1}"], solution=["1"], response_token_ids=[[0] * 10])
    assert got == pytest.approx([1.5])


def test_cosine_needs_token_ids(fallback):
    with pytest.raises(ConfigError, match="token ids"):
        one("cosine")(["x"], solution=["1"])


def test_repetition():
    comps = ["a b c a b c", "A b C a B c", "a b", "", "one two three four"]
    # a b c a b c: trigrams abc bca cab abc — 3 distinct of 4 → (1 − 3/4) · −1
    assert one("repetition")(comps) == pytest.approx([-0.25, -0.25, 0.0, 0.0, 0.0])
    args = R.RewardArgs(repetition_n_grams=2, repetition_max_penalty=-2.0)
    # bigrams: (a a) ×3 — 1 distinct of 3 → (1 − 1/3) · −2
    assert one("repetition", args)(["a a a a"]) == pytest.approx([-4 / 3])


def test_soft_overlong():
    args = R.RewardArgs(soft_max_length=20, soft_cache_length=5)  # no punishment up to 20 − 5 = 15 tokens
    got = one("soft_overlong", args)(["x"] * 4, response_token_ids=[[0] * n for n in (10, 15, 18, 25)])
    assert got == pytest.approx([0.0, 0.0, -3 / 5, -10 / 5])  # not floored at −1 (as ms-swift)
    default = R.RewardArgs(max_completion_length=8, soft_cache_length=4)
    assert one("soft_overlong", default)(["x"], response_token_ids=[[0] * 6]) == pytest.approx([-0.5])


def test_soft_overlong_needs_cache_length():
    with pytest.raises(ConfigError, match="soft_cache_length"):
        one("soft_overlong")
    with pytest.raises(ConfigError, match="must be below"):
        one("soft_overlong", R.RewardArgs(soft_max_length=10, soft_cache_length=10))


# ------------------------------------------------------------------ TRL built-ins

def test_trl_builtins(fallback):
    convo = [[{"role": "assistant", "content": "<think>r</think> so \\boxed{2}"}],
             [{"role": "assistant", "content": "<think>r <think> \\boxed{3}"}]]
    assert R.think_format_reward(convo) == [1.0, 0.0]
    assert R.accuracy_reward(convo, solution=["2", "2"]) == [1.0, 0.0]
    assert R.accuracy_reward(convo, solution=["", "2"]) == [None, 0.0]  # TRL skips an unparseable solution
    assert R.reasoning_accuracy_reward(["<think>\\boxed{2}", "</think>\\boxed{2}"], solution=["2", "2"]) == [0.0, 1.0]
    fn = one("get_soft_overlong_punishment")  # TRL's CLI: L_max 1280, L_cache 256
    rows, _ = R.score([fn], ["a", "b", "c"], completion_ids=[[0] * 1000, [0] * 1100, [0] * 1300])
    assert [r[0] for r in rows] == pytest.approx([0.0, (1024 - 1100) / 256, -1.0])
    assert fn.name == "soft_overlong_punishment_reward" and fn.style == "trl"


# ------------------------------------------------------------------ ms-swift plugin files

PLUGIN_3X = """\
    import re
    from typing import List

    from swift.plugin import ORM, orms


    class MyReward(ORM):

        def __call__(self, completions, solution, **kwargs) -> List[float]:
            rewards = []
            for content, sol in zip(completions, solution):
                rewards.append(1.0 if sol in content else 0.0)
            return rewards


    orms['my_reward'] = MyReward
"""

PLUGIN_4X = """\
    from swift.rewards import ORM, orms


    class LengthReward(ORM):
        def __call__(self, completions, **kwargs):
            self.seen = kwargs
            return [len(c) / 10 for c in completions]


    class NoneReward(ORM):
        def __call__(self, completions, **kwargs):
            return [None if 'skip' in c else 1.0 for c in completions]


    orms['length_reward'] = LengthReward
    orms['none_reward'] = NoneReward
"""


@needs_no_swift
def test_plugin_swift_3x(tmp_path):
    path = write(tmp_path / "plugin.py", PLUGIN_3X)
    fn = one("my_reward", plugins=[path])
    assert fn.name == "MyReward" and fn.spec == "my_reward" and not fn.is_async
    rows, errors = R.score([fn], ["the answer is 42", "no"], columns={"solution": ["42", "42"]})
    assert rows == [[1.0], [0.0]] and errors == []
    # the stand-in for ms-swift existed only while the plugin ran
    assert "swift" not in sys.modules and importlib.util.find_spec("swift") is None


@needs_no_swift
def test_plugin_with_the_usual_imports_of_real_plugins(tmp_path):
    """Real ms-swift plugins also import the registry's module itself and ms-swift's logger."""
    path = write(tmp_path / "plugin.py", "from swift.plugin.orm import ORM, orms\n"
                                         "from swift.rewards.orm import AsyncORM\n"
                                         "from swift.utils import get_logger\n"
                                         "logger = get_logger()\n"
                                         "class Len(ORM):\n"
                                         "    def __call__(self, completions, **kwargs):\n"
                                         "        logger.info('scoring %d', len(completions))\n"
                                         "        return [float(len(c)) for c in completions]\n"
                                         "orms['len'] = Len\n")
    fn = one("len", plugins=[path])
    rows, errors = R.score([fn], ["ab", "abc"])
    assert rows == [[2.0], [3.0]] and errors == [] and "swift" not in sys.modules


@needs_no_swift
def test_plugin_swift_4x_kwargs_and_none(tmp_path):
    path = write(tmp_path / "plugin4.py", PLUGIN_4X)
    length, none = R.load_reward_functions(["length_reward", "none_reward"], [path], R.RewardArgs())
    assert length.fn.args == R.RewardArgs()  # ms-swift passes args=; plugins read self.args
    msgs = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": c}] for c in ("abcde", "skip")]
    rows, errors = R.score([length, none], ["abcde", "skip"], prompts=["q", "q"], columns={"solution": ["s1", "s2"]},
                           messages=msgs, trainer_state={"global_step": 3}, weights=[1.0, 0.5],
                           completion_ids=[[1, 2], [3]])
    assert rows[0] == [0.5, 1.0] and rows[1][0] == 0.4 and math.isnan(rows[1][1])
    assert errors == []
    seen = length.fn.seen
    assert seen["solution"] == ["s1", "s2"] and seen["messages"] == msgs and seen["trainer_state"] == {"global_step": 3}
    assert seen["response_token_ids"] == seen["completion_ids"] == [[1, 2], [3]] and seen["prompts"] == ["q", "q"]


@needs_no_swift
def test_async_plugin_runs_concurrently(tmp_path):
    """Two async rewards: the first waits for an event only the second sets, so it finishes only if they run
    together (asyncio.gather), as in ms-swift."""
    path = write(tmp_path / "async_plugin.py", """\
        import asyncio
        from swift.rewards import AsyncORM, orms

        EVENT = {}


        def event():
            return EVENT.setdefault('e', asyncio.Event())


        class Waits(AsyncORM):
            async def __call__(self, completions, **kwargs):
                await asyncio.wait_for(event().wait(), timeout=10)
                return [1.0] * len(completions)


        class Sets(AsyncORM):
            async def __call__(self, completions, **kwargs):
                await asyncio.sleep(0)
                event().set()
                return [2.0] * len(completions)


        orms['waits'] = Waits
        orms['sets'] = Sets
    """)
    fns = R.load_reward_functions(["waits", "format", "sets"], [path], R.RewardArgs())
    assert [f.is_async for f in fns] == [True, False, True]
    rows, _ = R.score(fns, ["x", "y"])
    assert rows == [[1.0, 0.0, 2.0], [1.0, 0.0, 2.0]]


@needs_no_swift
def test_plugin_may_replace_a_builtin(tmp_path):
    path = write(tmp_path / "override.py", """\
        from swift.rewards import ORM, orms

        class Always(ORM):
            def __call__(self, completions, **kwargs):
                return [0.25] * len(completions)

        orms['accuracy'] = Always
    """)
    assert one("accuracy", plugins=[path])(["x"]) == [0.25]


def test_installed_swift_registry_is_read(tmp_path, monkeypatch):
    """With ms-swift installed (here a minimal fake package), plugins use the real one and what they register
    in its swift.rewards.orms is found after loading."""
    pkg = tmp_path / "site" / "swift"
    pkg.mkdir(parents=True)
    write(pkg / "__init__.py", "")
    write(pkg / "rewards.py", """\
        class ORM:
            def __init__(self, args=None, **kwargs):
                self.args = args

        class AsyncORM(ORM):
            pass

        orms = {'accuracy': None}
    """)
    for key in [k for k in sys.modules if k == "swift" or k.startswith("swift.")]:
        monkeypatch.delitem(sys.modules, key)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    path = write(tmp_path / "plugin.py", """\
        import swift.rewards
        from swift.rewards import ORM, orms

        class Real(ORM):
            def __call__(self, completions, **kwargs):
                return [1.0 if isinstance(self, swift.rewards.ORM) else 0.0 for _ in completions]

        orms['real_swift'] = Real
    """)
    try:
        fn = one("real_swift", plugins=[path])
        assert fn(["a"]) == [1.0] and fn.fn.args == R.RewardArgs()
        assert one("accuracy").fn.__class__ is R.MathAccuracy  # ms-swift's own built-ins are not taken over
    finally:
        for key in ("swift", "swift.rewards"):
            sys.modules.pop(key, None)


# ------------------------------------------------------------------ TRL-style module.func

def test_trl_module_func(tmp_path, monkeypatch):
    write(tmp_path / "my_trl_rewards.py", """\
        import asyncio


        def len_reward(prompts, completions, completion_ids, **kwargs):
            return [float(len(ids)) + (0.5 if p[0]['content'] == 'q' else 0) for p, ids in zip(prompts, completion_ids)]


        def content_reward(completions, **kwargs):
            return [1.0 if c[0]['content'] == 'hi' else 0.0 for c in completions]


        async def async_reward(completions, **kwargs):
            await asyncio.sleep(0)
            return [None, 3.0]


        class ClassReward:
            def __call__(self, completions, **kwargs):
                return [-1.0 for _ in completions]
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ["my_trl_rewards.len_reward", "my_trl_rewards:content_reward", "my_trl_rewards.async_reward",
             "my_trl_rewards.ClassReward"]
    fns = R.load_reward_functions(names, [], R.RewardArgs())
    assert [f.name for f in fns] == ["len_reward", "content_reward", "async_reward", "ClassReward"]
    assert [f.style for f in fns] == ["trl"] * 4 and fns[2].is_async
    prompts = [[{"role": "user", "content": "q"}], [{"role": "user", "content": "r"}]]
    rows, _ = R.score(fns, ["hi", "ho"], prompts=prompts, completion_ids=[[1, 2, 3], [4]])
    assert rows[0][:2] == [3.5, 1.0] and math.isnan(rows[0][2]) and rows[0][3] == -1.0
    assert rows[1] == [1.0, 0.0, 3.0, -1.0]


def test_module_func_from_current_directory(tmp_path, monkeypatch):
    write(tmp_path / "cwd_rewards.py", "def r(completions, **kwargs):\n    return [7.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    assert one("cwd_rewards.r")(["a"]) == [7.0]


# ------------------------------------------------------------------ None → NaN, errors

def test_all_none_row_is_reported(tmp_path, monkeypatch):
    write(tmp_path / "none_rewards.py", "def nothing(completions, **kwargs):\n    return [None, 1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows, errors = R.score([one("none_rewards.nothing")], ["a", "b"])
    assert math.isnan(rows[0][0]) and rows[1] == [1.0]
    assert errors == ["completion 0: every reward function returned None (its reward counts as 0)"]


def test_scores_feed_the_advantages(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from tunesmith.train.ops.losses import combine_rewards, group_advantages
    write(tmp_path / "mixed.py", "def m(completions, **kwargs):\n    return [None, 1.0, 2.0, None]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows, _ = R.score([one("format"), one("mixed.m")], ["<think>a</think><answer>b</answer>", "x", "y", "z"])
    combined = combine_rewards(torch.tensor(rows, dtype=torch.float64), [1.0, 1.0])
    assert combined.tolist() == [1.0, 1.0, 2.0, 0.0]
    assert group_advantages(combined, 2).tolist() == [0.0, 0.0, pytest.approx(1 / (2 ** 0.5 + 1e-4)),
                                                      pytest.approx(-1 / (2 ** 0.5 + 1e-4))]


def test_unknown_name_suggests_nearest():
    with pytest.raises(ConfigError, match="unknown reward function 'acuracy'. Did you mean 'accuracy'"):
        one("acuracy")
    with pytest.raises(ConfigError, match="Did you mean 'repetition'"):
        one("repetiton")
    with pytest.raises(ConfigError, match="MathORM is not built into tunesmith"):
        one("math")


def test_bad_module_func(tmp_path, monkeypatch):
    write(tmp_path / "has_one.py", "def f(completions, **kwargs):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="no module named 'no_such_module'"):
        one("no_such_module.f")
    with pytest.raises(ConfigError, match="has no attribute 'g'"):
        one("has_one.g")


@needs_no_swift
@pytest.mark.parametrize("body, match", [
    ("from swift.plugin import ORM, orms\nx = 1\nraise RuntimeError('boom')\n", r"bad\.py:3: .*RuntimeError: boom"),
    ("from swift.plugin import ORM, orms\ndef broken(:\n    pass\n", r"bad\.py:2: syntax error"),
    ("from swift.plugin import ORM, orms, optimizers_map\n", r"bad\.py:1: .*does not provide"),
])
def test_plugin_errors(tmp_path, body, match):
    path = write(tmp_path / "bad.py", body)
    with pytest.raises(ConfigError, match=match):
        one("anything", plugins=[path])
    assert "swift" not in sys.modules


def test_missing_plugin_file(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.py: reward plugin file not found"):
        one("format", plugins=[str(tmp_path / "missing.py")])


@pytest.mark.parametrize("returns, match", [
    ("[1.0]", r"returned 1 rewards for 2 completions"),
    ("'1.0'", r"returned a str \('1.0'\), expected one value per completion: a list of 2 numbers or None"),
    ("1.0", r"returned a float \(1.0\), expected one value per completion: a list of 2 numbers or None"),
    ("{'a': 1.0}", r"returned a dict \(keys a\), expected one value per completion"),
    ("__import__('numpy').zeros((2, 1))", r"returned a ndarray of shape \(2, 1\), expected shape \(2,\)"),
    ("[1.0, 'x']", r"returned str 'x' among its rewards, expected numbers or None"),
    ("[1.0, float('-inf')]", r"returned -inf for completion 1 \('b'\): a reward must be finite \(None or NaN"),
    ("{}['missing']", r"raised KeyError: 'missing'"),
])
def test_bad_reward_output(tmp_path, monkeypatch, returns, match):
    module = f"wrong_{tmp_path.name}"  # a fresh module per case (imports are cached)
    write(tmp_path / f"{module}.py", f"def w(completions, **kwargs):\n    return {returns}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=rf"reward function w \({module}\.w\) " + match):
        R.score([one(f"{module}.w")], ["a", "b"])


def test_score_argument_checks():
    fmt = one("format")
    with pytest.raises(ConfigError, match="2 reward weights for 1 reward functions"):
        R.score([fmt], ["a"], weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="column 'solution' has 1 values for 2 completions"):
        R.score([fmt], ["a", "b"], columns={"solution": ["x"]})



def test_plugin_constructors_get_what_they_name_as_in_ms_swift(tmp_path):
    """ms-swift builds a reward class with the arguments its __init__ names: none, args, tokenizer."""
    from tunesmith.train.rl.rewards import load_reward_functions

    plugin = tmp_path / "ctor_plugin.py"
    plugin.write_text(
        "from swift.rewards import ORM, orms\n"
        "class NoArgs(ORM):\n"
        "    def __init__(self):\n        self.k = 1.0\n"
        "    def __call__(self, completions, **kwargs):\n        return [self.k for _ in completions]\n"
        "class WithTokenizer(ORM):\n"
        "    def __init__(self, tokenizer=None, **kwargs):\n        self.tok = tokenizer\n"
        "    def __call__(self, completions, **kwargs):\n        return [float(len(self.tok)) for _ in completions]\n"
        "orms['no_args'] = NoArgs\norms['with_tokenizer'] = WithTokenizer\n")
    fns = load_reward_functions(["no_args", "with_tokenizer"], [str(plugin)], tokenizer=[0, 1, 2])
    assert fns[0](["a"]) == [1.0] and fns[1](["a"]) == [3.0]


def test_accuracy_reads_numeric_solutions_and_skips_rows_without_one():
    from tunesmith.train.rl.rewards import load_reward_functions

    (acc,) = load_reward_functions(["accuracy"], [])
    assert acc(["The answer is \\boxed{3}", "\\boxed{3}", "\\boxed{4}"], solution=[3, None, "4"]) == [1.0, None, 1.0]
