"""`tunesmith web-ui` in a real browser (Debian's chromium driven by Playwright), on a tiny model: bad input shows the
CLI's own message inline; the Train form starts an SFT run and a GRPO run at once; the loss curve updates; a second
start into a busy folder is refused; the UI process is killed (SIGKILL) and the run keeps training; a new UI finds it
and stops it, naming the checkpoint; a reload still lists it; the GRPO run shows its reward curves; the checkpoint
answers on the Chat page, streamed; `tunesmith app` serves its model on a titled chat page. Screenshots are kept under the test's temporary folder (printed).

Skipped, saying why, where chromium, Playwright or gradio is missing. The modules share one workspace (runs carry
over from test to test, in file order)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import CAPITALS_DATA, EXAMPLES, REPO, free_port

pytest.importorskip("gradio", reason="gradio is not installed: pip install 'tunesmith[webui]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright "
                                                             "(the browser tests drive Debian's chromium with it)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("chromium is not installed (apt-get install chromium); the browser tests need it",
                allow_module_level=True)
expect = sync_api.expect
pytestmark = pytest.mark.slow
WAIT = 240_000  # ms: a training process starts in ~15 s alone, several times that on 2 loaded cores


class UI:
    """A `tunesmith web-ui` process on a free port, in the workspace."""

    def __init__(self, ws):
        self.port = free_port()
        argv = [sys.executable, "-m", "tunesmith", "web-ui", "--server_port", str(self.port), "--output_dir",
                str(ws["out"]), "--allowed_paths", ws["models"], EXAMPLES]
        self.log = open(ws["root"] / f"ui-{self.port}.log", "w")
        self.proc = subprocess.Popen(argv, cwd=ws["root"], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": REPO}, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}/"
        end = time.time() + 180
        while time.time() < end:
            assert self.proc.poll() is None, open(self.log.name).read()
            try:
                urllib.request.urlopen(self.url, timeout=5).close()
                return
            except OSError:
                time.sleep(0.5)
        raise AssertionError("the web UI did not answer within 180 s:\n" + open(self.log.name).read())

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def ws(tiny_models, tmp_path_factory):
    """The workspace: the tiny model, the output folder, the screenshots folder, the UI; afterwards every process
    the pages started that still runs is killed."""
    root = tmp_path_factory.mktemp("webui")
    model = tiny_models("llama")  # its random weights say words (qwen2's say newlines)
    state = {"root": root, "out": root / "out", "model": model, "models": os.path.dirname(model),
             "shots": root / "screenshots"}
    state["shots"].mkdir()
    state["ui"] = UI(state)
    yield state
    state["ui"].kill()
    for rec in state["out"].rglob("launch.json"):
        pid = json.loads(rec.read_text())["pid"]
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    print(f"\nscreenshots: {state['shots']}")


@pytest.fixture(scope="module")
def browser(ws):
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, ws):
    pg = browser.new_page(viewport={"width": 1280, "height": 1500})
    pg.goto(ws["ui"].url)
    pg.wait_for_selector("#start", timeout=WAIT)
    yield pg
    pg.close()


def _fill(pg, name, value):
    box = pg.locator(f"#flag-{name}").locator("textarea, input").first
    box.fill(str(value))
    box.press("Tab")


def _pick(pg, elem, value):
    """Type a value into a drop-down that takes values of its own (model, dataset)."""
    box = pg.locator(f"#{elem} input").first
    box.fill(value)
    box.press("Enter")


def _shot(pg, ws, name):
    pg.screenshot(path=str(ws["shots"] / f"{name}.png"), full_page=True)


def _select_run(pg, text):
    pg.get_by_role("tab", name="Runs").click()
    expect(pg.locator("#runs-table")).to_contain_text(text, timeout=WAIT)
    pg.locator("#run-select input").first.click()
    pg.locator("ul[role=listbox] li", has_text=text).first.click()


def _train_form(pg, ws, out, **flags):
    _pick(pg, "flag-model", ws["model"])
    _pick(pg, "flag-dataset", CAPITALS_DATA[0])
    for name, value in {"output_dir": ws["out"] / out, **flags}.items():
        _fill(pg, name, value)


def test_bad_input_shows_the_cli_message_inline(page, ws):
    from tunesmith.commands.web_ui import check_command

    _train_form(page, ws, "sft", lora_rank=0)
    page.click("#check")
    expect(page.locator("#train-message")).to_contain_text("error", timeout=WAIT)
    argv = ["--model", ws["model"], "--dataset", CAPITALS_DATA[0], "--lora_rank", "0", "--output_dir",
            str(ws["out"] / "sft")]
    assert page.inner_text("#train-message").strip() == check_command("sft", argv)
    assert page.inner_text("#command").strip().endswith("--lora_rank 0 --output_dir " + str(ws["out"] / "sft"))
    _shot(page, ws, "1-bad-input")


def test_two_runs_at_once_curves_and_a_busy_folder(page, ws):
    _train_form(page, ws, "sft", max_steps=100000, save_steps=50, logging_steps=1, gradient_accumulation_steps=1)
    page.locator("#group-OutputArgs").click()
    _fill(page, "save_total_limit", 2)
    page.click("#start")
    expect(page.locator("#train-message")).to_contain_text("started (pid", timeout=WAIT)
    page.click("#start")  # the same folder again, while it trains: refused
    expect(page.locator("#train-message")).to_contain_text("already training into", timeout=WAIT)
    page.locator("#method").get_by_text("grpo", exact=True).click()
    _fill(page, "output_dir", ws["out"] / "grpo")
    _fill(page, "reward_funcs", "accuracy format")
    for name, value in {"max_steps": 40, "per_device_train_batch_size": 4}.items():
        _fill(page, name, value)
    page.locator("#group-GRPOArgs").click()
    _fill(page, "num_generations", 4)
    _fill(page, "max_completion_length", 8)
    page.click("#start")
    expect(page.locator("#train-message")).to_contain_text("started (pid", timeout=WAIT)
    assert "tunesmith rlhf --rlhf_type grpo" in page.inner_text("#command")
    page.get_by_role("tab", name="Runs").click()
    table = page.locator("#runs-table")
    expect(table).to_contain_text(re.compile(r"grpo\s+training", re.S), timeout=WAIT)
    expect(table).to_contain_text(re.compile(r"sft\s+training", re.S), timeout=1000)  # both at once
    _shot(page, ws, "2-two-runs")
    _select_run(page, "out/sft/")
    caption = page.locator("#curve-0")
    expect(caption).to_contain_text(re.compile(r"loss: \d+ points"), timeout=WAIT)
    first = int(re.search(r"loss: (\d+) points", caption.inner_text()).group(1))
    expect(caption).not_to_contain_text(f"loss: {first} points", timeout=WAIT)  # the curve moved on
    expect(page.locator("#run-checkpoints")).to_contain_text("checkpoint-", timeout=WAIT)
    _shot(page, ws, "3-sft-curves")


def test_the_run_outlives_its_ui_and_a_new_ui_stops_it(browser, ws):
    ws["ui"].kill()  # SIGKILL: the page's process dies without cleaning up
    ws["ui"] = UI(ws)
    pg = browser.new_page(viewport={"width": 1280, "height": 1500})
    pg.goto(ws["ui"].url)
    _select_run(pg, "out/sft/")
    progress = pg.locator("#run-progress")
    expect(progress).to_contain_text("training", timeout=WAIT)
    step = int(re.search(r"step (\d+)/", progress.inner_text()).group(1))
    expect(progress).not_to_contain_text(f"step {step}/", timeout=WAIT)  # still training
    pg.click("#stop")
    expect(pg.locator("#run-action")).to_contain_text("sent SIGTERM", timeout=WAIT)
    message = pg.locator("#run-message")
    expect(message).to_contain_text("stopped by SIGTERM at step", timeout=WAIT)
    ckpt = re.search(r"the last: (\S+checkpoint-\d+)\.", message.inner_text()).group(1)
    assert os.path.isfile(os.path.join(ckpt, "adapter_config.json"))
    pg.reload()  # a reload lists it again, stopped, with its message
    _select_run(pg, "out/sft/")
    expect(pg.locator("#run-progress")).to_contain_text("stopped", timeout=WAIT)
    expect(pg.locator("#run-message")).to_contain_text(ckpt, timeout=WAIT)
    expect(pg.locator("#curve-0")).to_contain_text("loss", timeout=WAIT)
    _shot(pg, ws, "4-stopped")
    pg.close()
    ws["checkpoint"] = ckpt


def test_the_grpo_run_shows_its_reward_curves(page, ws):
    _select_run(page, "out/grpo/")
    expect(page.locator("#run-progress")).to_contain_text("finished", timeout=WAIT)
    reward = page.locator("[id^=curve-]", has_text="reward (GRPO)")
    expect(reward).to_contain_text(re.compile(r"reward: 40 points"), timeout=WAIT)
    expect(page.locator("[id^=curve-]", has_text="reward per function")).to_contain_text("rewards/", timeout=WAIT)
    _shot(page, ws, "5-grpo-curves")


def test_chat_with_the_checkpoint_streams(page, ws):
    _select_run(page, "out/sft/")
    expect(page.locator("#run-progress")).to_contain_text("stopped", timeout=WAIT)
    page.click("#chat-with")  # hands the last checkpoint to the Chat page
    expect(page.locator("#chat-model input").first).to_have_value(ws["checkpoint"], timeout=WAIT)
    page.click("#chat-load")
    expect(page.locator("#chat-status")).to_contain_text(f"loaded {ws['checkpoint']} (base ", timeout=WAIT)
    page.locator("#chat-temperature textarea").first.fill("0")
    page.locator("#chat-max_new_tokens input").first.fill("24")
    page.evaluate("""() => { window.__seen = []; const root = document.querySelector('#chatbot');
        new MutationObserver(() => { const bots = root.querySelectorAll('.message.bot');
            const text = bots.length ? bots[bots.length - 1].innerText.trim() : '';
            if (text && window.__seen[window.__seen.length - 1] !== text) window.__seen.push(text); })
        .observe(root, {subtree: true, childList: true, characterData: true}); }""")
    page.locator("#chat-input textarea").first.fill("What is the capital of France?")
    page.click("#chat-send")
    expect(page.locator("#chat-turn-status")).to_contain_text("finish reason", timeout=WAIT)
    seen = page.evaluate("window.__seen")
    assert len(seen) >= 2 and seen[-1], seen  # the reply grew on the page as it was generated
    _shot(page, ws, "6-chat")


def test_the_app_command_is_a_chat_page(browser, ws):
    """`tunesmith app --model … --studio_title …`: the chat page alone, titled, its sampling settings from the
    generation flags, a reply streamed."""
    port = free_port()
    log = open(ws["root"] / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "app", "--model", ws["model"], "--server_port",
                             str(port), "--studio_title", "Capitals bot", "--max_new_tokens", "12", "--temperature",
                             "0"], cwd=ws["root"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": REPO})
    try:
        end = time.time() + 180
        while time.time() < end:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).close()
                break
            except OSError:
                assert proc.poll() is None, open(log.name).read()
                time.sleep(0.5)
        pg = browser.new_page()
        pg.goto(f"http://127.0.0.1:{port}/")
        expect(pg.locator("#chat-status")).to_contain_text(f"loaded {ws['model']}", timeout=WAIT)
        assert pg.title() == "Capitals bot"
        expect(pg.locator("#chat-max_new_tokens input").first).to_have_value("12")
        pg.locator("#chat-input textarea").first.fill("Hello")
        pg.click("#chat-send")
        expect(pg.locator("#chat-turn-status")).to_contain_text("finish reason: length", timeout=WAIT)
        assert pg.locator("#chatbot .message.bot").last.inner_text().strip()
        _shot(pg, ws, "7-app")
        pg.close()
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
