"""GKD's teacher server checked at the start: a teacher whose tokenizer is not the student's is refused before
training (the vocab_size and tokenizer_fingerprint `tunesmith deploy` lists in GET /v1/models), the same
tokenizer passes, and an id outside the student's vocabulary mid-training is a one-line tunesmith error; the wait
for a teacher's /health says what it waits for."""
import random
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import free_port, http_json, serve_on_a_thread, train, write_jsonl
from tunesmith.errors import ConfigError, DataError, TunesmithError

pytestmark = pytest.mark.usefixtures("no_charts")

WORDS = "red green blue cat dog sun moon tree river stone bird fish".split()


def _deploy(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.inference.chat import ChatEngine
    from tunesmith.serve.app import create_app

    chat = ChatEngine(AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir))
    return chat, create_app(chat, {"teacher": None}, max_logprobs=64)


def test_a_teacher_with_another_tokenizer_is_refused_before_training(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    from tunesmith.train.rl.teacher_server import TeacherClient, TeacherServer

    student, other = tiny_models("qwen2"), tiny_models("qwen2", vocab_size=3000)
    rng = random.Random(0)
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(4))},
                      {"role": "assistant", "content": "red cat"}]} for _ in range(8)])
    chat, app = _deploy(other)
    try:
        with serve_on_a_thread(app) as port:
            url = f"http://127.0.0.1:{port}"
            status, body = http_json("GET", f"{url}/v1/models")
            assert status == 200 and body["data"][0]["vocab_size"] == len(AutoTokenizer.from_pretrained(other))
            with pytest.raises(ConfigError, match=r"teacher at .* has another tokenizer than the student --model "
                                                  r"\(its vocabulary has \d+ tokens, the student's \d+\)") as e:
                train("rlhf", "--rlhf_type", "gkd", "--model", student, "--dataset", data, "--max_steps", "1",
                      "--gkd_logits_topk", "4", "--teacher_model_server", url, "--report_to", "none",
                      "--output_dir", str(tmp_path / "out"), "--max_completion_length", "4")
            assert "\n" not in str(e.value)
            # the same tokenizer (another model's copy of it) passes
            TeacherClient((TeacherServer(url),), timeout=5).connect(AutoTokenizer.from_pretrained(other))
    finally:
        chat.close()


def test_an_id_outside_the_students_vocabulary_is_a_tunesmith_error():
    from tunesmith.train.ops.jsd import JSDSpec, TeacherVocabularyError, chunked_topk_jsd

    student = SimpleNamespace(hidden=torch.zeros(2, 8), weight=torch.zeros(10, 8), target=torch.zeros(2).long())
    with pytest.raises(TeacherVocabularyError, match="token id 12, outside the student's vocabulary of 10") as e:
        chunked_topk_jsd(student, torch.zeros(2, 2), torch.tensor([[1, 12], [2, 3]]), JSDSpec(0.5, topk=2))
    assert isinstance(e.value, TunesmithError) and "\n" not in str(e.value)


def test_waiting_for_a_teacher_says_what_it_waits_for(capsys):
    from tunesmith.train.rl.teacher_server import TeacherClient, TeacherServer

    url = f"http://127.0.0.1:{free_port()}"
    start = time.time()
    with pytest.raises(ConfigError, match=f"no teacher server answers at {url}"):
        TeacherClient((TeacherServer(url),), timeout=1.0).connect()
    assert time.time() - start < 30
    err = capsys.readouterr().err
    assert err.count("waiting up to 1 s") == 1 and url in err and "no flag changes it" in err


@pytest.mark.parametrize("value", ['{"url": "http://127.0.0.1:9"}', "127.0.0.1:8000", "ftp://h:1", "http://"])
def test_a_teacher_server_that_is_neither_a_url_nor_a_list_is_refused_at_parse(value):
    from tunesmith.train.rl.teacher_server import parse_teacher_servers

    with pytest.raises(ConfigError, match="neither a URL .* nor a JSON list") as e:
        parse_teacher_servers(value)
    assert "\n" not in str(e.value)
    assert parse_teacher_servers("http://127.0.0.1:9/")[0].url == "http://127.0.0.1:9"


def test_a_row_without_its_tag_column_is_refused_with_its_file_and_line(tiny_models, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "red"}, {"role": "assistant", "content": "cat"}],
             "src": "a"} for _ in range(4)]
    del rows[2]["src"]
    data = write_jsonl(tmp_path / "tagged.jsonl", rows)
    servers = '[{"url": "http://127.0.0.1:9", "tags": ["a"]}, {"url": "http://127.0.0.1:9", "tags": ["b"]}]'
    with pytest.raises(DataError, match=r"tagged\.jsonl:3: has no column src \(--teacher_tag_key\)"):
        train("rlhf", "--rlhf_type", "gkd", "--model", tiny_models("qwen2"), "--dataset", data, "--max_steps", "1",
              "--gkd_logits_topk", "4", "--teacher_model_server", servers, "--teacher_tag_key", "src",
              "--report_to", "none", "--output_dir", str(tmp_path / "out"))


def test_the_batch_routing_message_says_the_column_is_missing():
    from tunesmith.train.rl.teacher_server import TeacherServer, route

    servers = (TeacherServer("http://a", ("x",)), TeacherServer("http://b", ("y",)))
    with pytest.raises(ConfigError, match=r"sample\[1\] of the batch has no column src \(--teacher_tag_key\)"):
        route(["x", None], servers, "src")


def test_grpo_opd_rl_rows_are_checked_for_their_tag_too(tiny_models, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "red"}], "src": "a"} for _ in range(4)]
    rows[1]["src"] = "zzz"
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    servers = '[{"url": "http://127.0.0.1:9", "tags": ["a"]}, {"url": "http://127.0.0.1:9", "tags": ["b"]}]'
    with pytest.raises(DataError, match=r"prompts\.jsonl:2: field 'src': 'zzz' matches no teacher server"):
        train("rlhf", "--rlhf_type", "grpo", "--model", tiny_models("qwen2"), "--dataset", data, "--max_steps", "1",
              "--num_generations", "2", "--per_device_train_batch_size", "2", "--teacher_model_server", servers,
              "--teacher_tag_key", "src", "--report_to", "none", "--output_dir", str(tmp_path / "out"))


def test_a_missing_teacher_deepspeed_file_says_it_does_not_exist(tiny_models):
    from tunesmith.config.parser import parse_args
    from tunesmith.train.recipe import configure

    model = tiny_models("qwen2")
    with pytest.raises(ConfigError, match=r"--teacher_deepspeed /missing\.json: the file does not exist"):
        configure(parse_args("rlhf", ["--rlhf_type", "gkd", "--model", model, "--dataset", "x.jsonl",
                                      "--teacher_model", model, "--deepspeed", "zero2",
                                      "--teacher_deepspeed", "/missing.json"]))
