"""--streaming: rows read, encoded and packed on the fly. Training on a stream equals training on the same rows
encoded up front, resumes exactly, and refuses what a stream cannot do; `data stats --streaming` measures a sample."""
import json
import os
import random

import pytest

from conftest import losses_by_step, train, write_jsonl
from tunesmith.config.parser import parse_args
from tunesmith.data.load import LoadResult, iter_spec, read_spec, stream_records
from tunesmith.errors import ConfigError, DataError
from tunesmith.train import recipe

WORDS = "red blue green black white gold pink gray".split()


# the runs here are compared by their logged losses; drawing each run's charts would only cost time
pytestmark = pytest.mark.usefixtures("no_charts")


def _row(i):
    return {"messages": [{"role": "user", "content": "say " + " ".join(WORDS[: 1 + i % 7])},
                         {"role": "assistant", "content": " ".join(WORDS[: 1 + (3 * i) % 8])}]}


def _data(tmp_path, n=10, extra=()):
    return write_jsonl(tmp_path / "d.jsonl", [_row(i) for i in range(n)] + list(extra))


def _sft(model, data, out, *flags):
    """`tunesmith sft` on data, 2 rows a micro-batch, 2 micro-batches a step, every step logged."""
    return train("sft", "--model", model, "--dataset", data, "--per_device_train_batch_size", "2",
                 "--gradient_accumulation_steps", "2", "--logging_steps", "1", "--report_to", "none",
                 "--learning_rate", "5e-3", "--output_dir", str(out), *flags)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--packing", "true", "--max_length", "64"]], ids=["padded", "packed"])
def test_a_stream_trains_like_the_rows_encoded_up_front(tiny_models, tmp_path, mode):
    """File order (--dataset_shuffle false), bad rows dropped (--strict false): the same losses, step by step, across
    an epoch boundary (5 micro-batches per epoch, 2 per step)."""
    data = _data(tmp_path, 10, extra=["{broken json"])
    common = ["--max_steps", "5", "--dataset_shuffle", "false", "--strict", "false", "--save_strategy", "no",
              "--lora_dropout", "0", *mode]
    upfront = _sft(tiny_models("qwen2"), data, tmp_path / "a", *common)
    streamed = _sft(tiny_models("qwen2"), data, tmp_path / "b", *common, "--streaming", "true")
    a, b = losses_by_step(upfront["run_dir"]), losses_by_step(streamed["run_dir"])
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        assert abs(a[step] - b[step]) < 1e-6, (step, a[step], b[step])
    assert streamed["state"].epoch >= 1


@pytest.mark.slow
def test_a_resumed_stream_equals_the_uninterrupted_one(tiny_models, tmp_path):
    """Shuffled within a buffer, packed, LoRA dropout on: resuming at step 3 skips the batches already trained."""
    data = _data(tmp_path, 10)
    common = ["--streaming", "true", "--shuffle_buffer_size", "5", "--packing", "true", "--max_length", "48",
              "--max_steps", "6", "--save_steps", "3", "--lora_dropout", "0.1", "--per_device_train_batch_size", "1"]
    full = _sft(tiny_models("qwen2"), data, tmp_path / "full", *common)
    ckpt = os.path.join(full["run_dir"], "checkpoint-3")
    assert json.load(open(os.path.join(ckpt, "trainer_state.json")))["batches_done"] > 0
    resumed = _sft(tiny_models("qwen2"), data, tmp_path / "resumed", *common, "--resume_from_checkpoint", ckpt)
    a, b = losses_by_step(full["run_dir"]), losses_by_step(resumed["run_dir"])
    assert sorted(b) == [1, 2, 3, 4, 5, 6] and full["state"].epoch >= 1  # the stream ended and was read again
    for step in b:
        assert abs(a[step] - b[step]) < 1e-6, (step, a[step], b[step])


def test_what_a_stream_cannot_do_is_a_config_error(tiny_models, tmp_path):
    data = _data(tmp_path)

    def check(command, *flags):
        args = parse_args(command, ["--model", tiny_models("qwen2"), "--dataset", data, "--streaming", "true", *flags])
        recipe.configure(args)

    with pytest.raises(ConfigError, match="--streaming needs --max_steps"):
        check("sft")
    with pytest.raises(ConfigError, match="--split_dataset_ratio cannot split a stream.*--val_dataset"):
        check("sft", "--max_steps", "3", "--split_dataset_ratio", "0.1")
    with pytest.raises(ConfigError, match="--streaming: dpo reads its rows up front"):
        check("rlhf", "--rlhf_type", "dpo", "--max_steps", "3")
    check("sft", "--max_steps", "3", "--val_dataset", data)  # validation data is read whole, as without streaming


def test_bad_rows_stop_with_file_and_line_or_are_counted(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    from tunesmith.data.encode import ChatEncoder
    from tunesmith.data.stream import StreamingRows

    data = write_jsonl(tmp_path / "d.jsonl", [_row(0), _row(1), "{broken", _row(3), {"text": 5}])
    enc = ChatEncoder(AutoTokenizer.from_pretrained(tiny_models("qwen2")))

    def stream(strict):
        return StreamingRows(lambda tally: stream_records([data], tally), enc, "sft", strict)

    with pytest.raises(DataError, match="d.jsonl:3"):
        list(stream(True).rows())
    seen = []
    lenient = StreamingRows(lambda tally: stream_records([data], tally), enc, "sft", False, report=seen.append)
    assert len(list(lenient.rows())) == 3 and seen[0]["dropped"] == 2 and "d.jsonl:3" in seen[0]["reasons"][0]
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        stream_records([str(tmp_path / "missing.jsonl")], LoadResult([], []))  # checked before any row is read


@pytest.mark.slow
def test_a_streamed_run_refused_by_its_data_leaves_nothing_or_says_how_to_resume(tiny_models, tmp_path):
    """Every file's first row is read before training (a later file that cannot be read stops the run before the
    run directory exists); a bad row met mid-run removes a run with no checkpoint, and otherwise names the
    checkpoint to resume from."""
    good = _data(tmp_path, 10)
    unreadable = tmp_path / "second.jsonl"
    unreadable.write_bytes(b"\xff\xfe{\x00\n")
    common = ["--streaming", "true", "--max_steps", "6", "--dataset_shuffle", "false"]
    with pytest.raises(DataError, match="second.jsonl: is a UTF-16"):
        _sft(tiny_models("qwen2"), good, tmp_path / "a", *common, "--dataset", good, str(unreadable))
    assert not (tmp_path / "a").exists()

    late = write_jsonl(tmp_path / "late.jsonl", [_row(i) for i in range(10)] + ["{broken"])
    with pytest.raises(DataError, match="late.jsonl:11") as e:
        _sft(tiny_models("qwen2"), late, tmp_path / "b", *common, "--save_steps", "100")
    assert "resume" not in str(e.value) and not os.listdir(tmp_path / "b")  # nothing to resume: nothing kept
    with pytest.raises(DataError, match="late.jsonl:11") as e:
        _sft(tiny_models("qwen2"), late, tmp_path / "c", *common, "--save_steps", "1")
    [run] = os.listdir(tmp_path / "c")
    ckpt = os.path.join(tmp_path / "c", run, "checkpoint-2")  # 10 rows = 2.5 steps of 4: the bad row is in step 3
    assert os.path.isdir(ckpt) and str(e.value).endswith(f"continue with --resume_from_checkpoint {ckpt}.")


def test_shuffling_is_a_seeded_buffer_permutation():
    from tunesmith.data.stream import buffer_shuffle, pack_stream

    def order(seed):
        return list(buffer_shuffle(iter(range(50)), 8, random.Random(seed)))

    assert order(1) == order(1) != order(2) and sorted(order(1)) == list(range(50))
    assert order(1)[:5] != list(range(5))
    groups = list(pack_stream(iter([3, 5, 2, 7, 1, 4]), 8, lambda n: n, buffer=3))
    assert [sorted(g) for g in groups] == [[3, 5], [2], [1, 7], [4]]  # a buffer of 3 rows packed at a time


def test_each_rank_takes_its_slice_of_every_global_batch():
    """The same cut as rows in a sequence: per-device batch 2, 3 processes; the last, short batch goes too."""
    from tunesmith.train.distributed import rank_batches
    from tunesmith.train.microbatches import _rank_slices, epoch_batches

    for rank in range(3):
        streamed = list(_rank_slices(iter(range(20)), 6, 3, rank))
        assert streamed == rank_batches(epoch_batches(20, 6, 0, False), 3, rank)[0]
    assert list(_rank_slices(iter(range(12)), 6, 3, 1)) == [[2, 3], [8, 9]]  # every world-th per-device batch


def test_hub_and_local_streams_read_the_rows_loading_reads(tmp_path):
    folder = tmp_path / "hub"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [_row(i) for i in range(6)])
    local = [(r.row, r.line) for r in read_spec(str(folder))]
    assert [(r.row, r.line) for r in iter_spec(str(folder))] == local
    # a hub id goes through datasets.load_dataset(..., streaming=True); a local folder stands in for the hub
    hub = list(iter_spec(f"hf::{folder}"))
    assert [h.row["messages"] for h in hub] == [r["messages"] for r, _ in local]
    assert hub[0].source == f"hf::{folder}" and [h.line for h in hub] == [1, 2, 3, 4, 5, 6]
    # path#N takes the first N rows, from the start again while there are fewer
    assert [r.line for r in iter_spec(f"{folder / 'train.jsonl'}#8")] == [1, 2, 3, 4, 5, 6, 1, 2]


def test_data_stats_streaming_measures_a_sample(tmp_path, capsys):
    from tunesmith.commands.data import stats

    data = _data(tmp_path, 12)
    s = stats(parse_args("data", ["stats", "--dataset", data, "--streaming", "true", "--num_rows", "5"]))
    assert s["rows"] == 5 and "first 5 rows" in s["sample"] and "a sample" in capsys.readouterr().out
    whole = stats(parse_args("data", ["stats", "--dataset", data, "--streaming", "true"]))
    assert whole["rows"] == 12 and "all 12 rows" in whole["sample"]
    assert stats(parse_args("data", ["stats", "--dataset", data]))["tokens"] == whole["tokens"]


@pytest.mark.slow
def test_two_ddp_processes_stream_like_one_process_with_the_same_global_batch(tiny_models, tmp_path):
    """Under torchrun every rank reads the stream and trains on its slice of each global batch."""
    from conftest import CAPITALS_DATA, launch, run_dir_of, step_losses

    common = ["sft", "--model", tiny_models("qwen2"), "--dataset", *CAPITALS_DATA, "--streaming", "true",
              "--shuffle_buffer_size", "8", "--packing", "true", "--max_length", "64", "--max_steps", "3",
              "--logging_steps", "1", "--learning_rate", "5e-3", "--lora_dropout", "0",
              "--gradient_accumulation_steps", "2", "--save_strategy", "no", "--report_to", "none"]
    launch([*common, "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "one")], nproc=1)
    launch([*common, "--per_device_train_batch_size", "1", "--output_dir", str(tmp_path / "two")], nproc=2)
    one, two = step_losses(run_dir_of(str(tmp_path / "one"))), step_losses(run_dir_of(str(tmp_path / "two")))
    assert two == pytest.approx(one, abs=1e-5) and len(one) == 3
