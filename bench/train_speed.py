"""Training throughput and memory: tunesmith against TRL and ms-swift, in one run.

    python bench/train_speed.py --method sft --rows 256 --repeats 2                   # the small shape
    python bench/train_speed.py --method dpo --rows 128 --repeats 2
    python bench/train_speed.py --shape qwen2.5-0.5b --method both --rows 48 --max-length 512   # the real vocabulary
    python bench/train_speed.py --method all --rows 64 --dpo-rows 32 --repeats 2    # SFT, DPO, KTO and reward model

Shapes (random weights, fp32 on the CPU, the same model directory for every system):
- `small`: a Qwen2-shaped model of 7.1M parameters (hidden 256, 4 layers, 16,384-row vocabulary) and
  tunesmith.testing's tokenizer.
- `qwen2.5-0.5b`: Qwen2.5-0.5B's layer shape (hidden 896, 14 heads / 2 KV heads, MLP 4864, tied embeddings,
  RMSNorm eps 1e-6, rope theta 1e6) with its real 151,936-row vocabulary and the real Qwen2.5 tokenizer and chat
  template (bench/peers/qwen_tokenizer.py), with fewer layers than the real 24 (`--layers`, default 2) so a CPU
  can run it. Here the output layer is most of the work, as it is for small models on a GPU: the [tokens x 151,936]
  logits cost 0.6 MB per token in fp32.

Methods (--method, comma-separated, or `both` = sft,dpo, `all` = sft,dpo,kto,rm):
- sft: chat rows (`messages`), the loss on the reply.
- dpo: preference pairs (`prompt`/`chosen`/`rejected`), beta 0.1, a reference (the base with the adapter off).
- kto: single replies labelled desirable or not, in ms-swift's KTO format (`messages` + `"label": true|false`, half
  of each), read as is by tunesmith and ms-swift; TRL's KTOTrainer gets them as prompt/completion/label. Beta 0.1,
  weights 1, a reference, the KL estimate from mismatched pairs within each batch.
- rm: the same kind of pairs as DPO, trained as a reward model: a one-output sequence-classification head
  (`score`, trained in full next to the LoRA), Bradley-Terry loss, no reference. The output layer is hidden x 1,
  so the vocabulary costs nothing here.
tunesmith packs RM like DPO and trains KTO in the peers' 4 x 4 batches without their padding (--padding_free: KTO's
KL term pairs replies within a batch, so its rows are not packed across batches).

The same data with a long-tailed length distribution (tens to ~1000 tokens, replies capped so that every row fits
--max-length for every system: see dataset_tokens), the same LoRA config (r 8, alpha 32, all-linear), about the same
rows per optimiser step (4 x 4 for the peers) and one epoch. Each system runs in its own process, alternating
(A B C A B C ...), so drift hits all alike. Every system is credited with the same token count: the dataset's tokens
as tunesmith encodes them (KTO: the labelled replies, not the mismatched sequences of its KL term). Wall time
includes process start, imports and model loading; "train s" is each trainer's own `train_runtime` (the loop only),
read from its log.
Peak RSS is the process tree's (both ranks for the two-process rows), sampled every 50 ms. Each run also records the
share of the CPUs that other processes took meanwhile. Prints the library versions, a table per method and the
ratios tunesmith/peer; --json writes them; RESULTS.md records them with the command.

Systems (each at its best on a CPU, each from its own install: bench/.venv-tunesmith, bench/.venv-trl and
bench/.venv-swift, made by --make-user-venvs and --make-swift-venv; see bench/installs.py for why):
- tunesmith: --packing true (exact: position_ids restart per row), chunked log-probs (the default); KTO 4 x 4 with
  --padding_free true (tunesmith refuses --packing for it).
- tunesmith-padded: the peers' exact batch (4 x 4), padded, to show what packing (KTO: dropping the padding) adds.
- tunesmith-unshared (DPO): packed, --prefix_sharing false.
- tunesmith-ddp2: packed, `torchrun --nproc_per_node 2` (gloo, one thread per rank), same rows per step.
- tunesmith-zero3: the same two processes with `--deepspeed zero3`.
- trl: TRL 1.x SFTTrainer/DPOTrainer/KTOTrainer/RewardTrainer (bench/peers/trl_train.py), padded (its
  padding-free/packing need flash attention; TRL itself disables DPO padding_free on CPU), completion-only loss,
  the same LoRA (task SEQ_CLS for the reward model, which trains the score head in full).
- ms-swift: `swift sft` / `swift rlhf --rlhf_type dpo|kto|rm` 4.6 from bench/.venv-swift (created by
  --make-swift-venv; it pins older transformers/trl/peft), padded (its --packing refuses to run without flash
  attention).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import installs  # bench/installs.py: each system from its own install

SWIFT_VENV = os.path.join(HERE, ".venv-swift")
WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or has had "
         "not but one all their new first two been after who its also they other more time years into only over "
         "city world state school during such many most three some when where these there used made can would "
         "river north south east west king music film team game house line side water life power party war").split()


@dataclass(frozen=True)
class Shape:
    """A model every system trains: random weights, fp32. `vocab` is the embedding (= tied output) rows."""
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    real_tokenizer: bool  # the real Qwen2.5 tokenizer (151,665 tokens) rather than tunesmith.testing's 2,048 BPE


SHAPES = {
    "small": Shape("small", hidden=256, layers=4, heads=4, kv_heads=2, intermediate=704, vocab=16384,
                   real_tokenizer=False),
    # Qwen2.5-0.5B's config.json, except num_hidden_layers (24 in the real model)
    "qwen2.5-0.5b": Shape("qwen2.5-0.5b", hidden=896, layers=2, heads=14, kv_heads=2, intermediate=4864,
                          vocab=151936, real_tokenizer=True),
}


@dataclass(frozen=True)
class RunSpec:
    """What one measured process trains: method ("sft"/"dpo"/"kto"/"rm"), model directory, data file, output
    directory and --max_length in tokens (per sequence; a pair's chosen and rejected sides each)."""
    method: str
    model: str
    data: str
    out: str
    max_length: int


def build_shape_model(out: str, shape: Shape) -> str:
    """Save `shape` with random weights (seed 0) and its tokenizer to `out`; return a line saying which tokenizer."""
    if not shape.real_tokenizer:
        from tunesmith.testing import build_model
        build_model(out, "qwen2", hidden=shape.hidden, layers=shape.layers, heads=shape.heads,
                    intermediate=shape.intermediate, model_vocab=shape.vocab)
        return f"tunesmith.testing qwen2 tokenizer (2,048-token BPE), model vocabulary widened to {shape.vocab:,}"
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    try:
        sys.path.insert(0, os.path.join(HERE, "peers"))
        from qwen_tokenizer import copy_cached_qwen25_tokenizer
        copy_cached_qwen25_tokenizer(out)
        tok = AutoTokenizer.from_pretrained(out)
        which = "the real Qwen2.5 tokenizer (151,643 BPE ranks + 22 added tokens, its chat template)"
    except Exception as e:  # noqa: BLE001  (no registry: a tokenizer of another size still exercises the vocabulary)
        from tunesmith.testing import build_tokenizer
        print(f"real Qwen tokenizer unavailable ({type(e).__name__}: {e}); using tunesmith.testing's",
              file=sys.stderr)
        tok = build_tokenizer("qwen2")
        tok.save_pretrained(out)
        which = f"tunesmith.testing qwen2 tokenizer (2,048-token BPE), model vocabulary widened to {shape.vocab:,}"
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, max_position_embeddings=32768, rope_theta=1e6,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=pad, eos_token_id=eos,
                      pad_token_id=pad)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad)
    model.save_pretrained(out)
    return which


def model_params(shape: Shape) -> int:
    """Parameters of `shape` (tied output layer counted once)."""
    h, kv_dim = shape.hidden, shape.hidden // shape.heads * shape.kv_heads
    attn = 2 * h * h + 2 * h * kv_dim + h + 2 * kv_dim  # q and o, k and v, the q/k/v biases (o has none)
    layer = attn + 3 * h * shape.intermediate + 2 * h
    return shape.vocab * h + shape.layers * layer + h


PAIRED = ("dpo", "rm")  # methods trained on preference pairs (two sequences per row)
METHODS = ("sft", "dpo", "kto", "rm")
METHOD_SETS = {"both": ("sft", "dpo"), "all": METHODS}


def make_data(path: str, rows: int, method: str, seed: int = 0, prompt_words: int = 0, max_words: int = 700) -> None:
    """Chat rows whose reply lengths follow a log-normal (median ~60 words, long tail capped at `max_words`).
    Prompts are 5-40 words, or with prompt_words a log-normal of that median (multi-turn context, system prompts,
    retrieved documents: where DPO prefix sharing matters). SFT: `messages`. KTO: `messages` + `label`, ms-swift's
    KTO format, alternately true and false (KTO learns from both). DPO and RM: `prompt`/`chosen`/`rejected`."""
    rng = random.Random(seed)

    def text(n):
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            q = text(min(max_words, max(5, int(rng.lognormvariate(math.log(prompt_words), 0.7))))
                     if prompt_words else rng.randint(5, 40))
            n = min(max_words, max(8, int(rng.lognormvariate(math.log(60), 0.9))))
            if method in ("sft", "kto"):
                row = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": text(n)}]}
                if method == "kto":
                    row["label"] = i % 2 == 0
            else:
                m = min(max_words, max(8, int(n * rng.uniform(0.6, 1.4))))
                row = {"prompt": q, "chosen": text(n), "rejected": text(m)}
            fh.write(json.dumps(row) + "\n")


QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def swift_headroom(model: str) -> int:
    """Tokens by which ms-swift's `qwen2_5` template can render a row longer than the tokenizer's own chat template
    (which tunesmith and TRL use): ms-swift adds Qwen's default system prompt, the real Qwen2.5 template adds the
    same one (0 here), tunesmith.testing's template a shorter one (the small shape)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    user = [{"role": "user", "content": "Hello."}]

    def n(messages):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])
    return max(0, n([{"role": "system", "content": QWEN_SYSTEM}, *user]) - n(user))


def dataset_tokens(model: str, data: str, method: str, max_length: int, headroom: int = 0) -> tuple[int, int]:
    """(the tokens every system is credited with: the dataset as tunesmith's encoder renders it, rows that might
    not fit max_length). Over-long rows would be dropped by tunesmith and ms-swift but truncated by TRL, so the data
    is sized to have none (main shrinks the replies until none is over). A row counts as over when its longest
    sequence plus `headroom` (see swift_headroom) exceeds max_length; for KTO also when its prompt followed by the
    longest reply of the data, or the longest prompt followed by its reply, would: KTO's KL term pairs each prompt
    with another row's reply (ms-swift after shuffling, so any pair), and ms-swift drops a row whose mismatched
    sequence is too long."""
    from transformers import AutoTokenizer

    from tunesmith.data.encode import IGNORE, ChatEncoder
    from tunesmith.data.load import load_datasets

    enc = ChatEncoder(AutoTokenizer.from_pretrained(model), loss_scale="last_round")
    total = 0
    longest, parts = [], []  # per row: its longest sequence; (prompt tokens, reply tokens) for KTO
    for rec in load_datasets([data]).records:
        if method not in PAIRED:  # sft, kto (one reply each; KTO's mismatched KL sequences are not credited)
            e = enc.encode(rec)
            lengths = [len(e.input_ids)]
            if method == "kto":
                p = next(i for i, x in enumerate(e.labels) if x != IGNORE)
                parts.append((p, len(e.input_ids) - p))
        else:
            c, r = enc.encode_pair(rec)
            lengths = [len(c.input_ids), len(r.input_ids)]
        total += sum(lengths)
        longest.append(max(lengths))
    if parts:
        max_p, max_r = max(p for p, _ in parts), max(r for _, r in parts)
        longest = [max(n, p + max_r, max_p + r) for n, (p, r) in zip(longest, parts)]
    return total, sum(n + headroom > max_length for n in longest)


def train_runtime(log: str, out: str) -> Optional[float]:
    """The trainer's own loop time in seconds, or None: TRL and ms-swift print `train_runtime` in their log,
    tunesmith writes it to the run directory's logging.jsonl (out/v*/logging.jsonl)."""
    texts = []
    for path in [log, *glob.glob(os.path.join(out, "v*", "logging.jsonl"))]:
        try:
            texts.append(open(path, encoding="utf-8", errors="replace").read())
        except OSError:
            pass
    found = re.findall(r"""['"]train_runtime['"]\s*:\s*['"]?([0-9.]+)""", "\n".join(texts))
    return float(found[-1]) if found else None


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy (all processes), since boot."""
    import psutil
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal


def run_measured(cmd: list[str], env: dict, log: str) -> tuple[float, float, int, float]:
    """(wall seconds, peak RSS GiB of the process tree, exit code, the share of all CPUs that other processes used
    meanwhile). On a shared 2-core machine a little outside work slows torch's threaded ops a lot, so every run
    says how busy the machine was."""
    import psutil

    t0, busy0 = time.time(), busy_cpu_seconds()
    ours: dict[int, float] = {}  # pid -> last CPU seconds seen (children that exit keep their last reading)
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        ps = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                tree = [ps, *ps.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
                for p in tree:
                    c = p.cpu_times()
                    ours[p.pid] = c.user + c.system
            except psutil.Error:
                pass
            time.sleep(0.05)
    wall = time.time() - t0
    other = max(0.0, busy_cpu_seconds() - busy0 - sum(ours.values())) / (wall * (os.cpu_count() or 1))
    return wall, peak / 2 ** 30, proc.returncode, other


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tunesmith_cmd(spec: RunSpec, packed: bool = True, shared: Optional[bool] = None, world: int = 1,
                  deepspeed: Optional[str] = None) -> list[str]:
    """Packed: one packed row per micro-batch, accumulation chosen so that a step holds about as many rows as the
    peers' 4 x 4 (SFT: 2 packs of max_length tokens, about 14 rows at 1024; DPO: 3 packs of 2 x max_length, about
    18 pairs). With `world` processes the accumulation is divided by it, rounded up (DPO: 2 x 2 = 4 packs a step).
    Padded: the peers' exact batch (4 x 4), for an apples-to-apples view of what packing adds; with `world`
    processes 4 x 4/world each. RM packs as DPO does (pairs of 2 x max_length); KTO is never packed (tunesmith
    refuses --packing for it: its KL term pairs each reply with another row's prompt) but runs the peers' 4 x 4
    batches with --padding_free true, or padded."""
    ml = spec.max_length
    common = ["--model", spec.model, "--dataset", spec.data, "--train_type", "lora", "--lora_rank", "8",
              "--lora_alpha", "32", "--target_modules", "all-linear", "--num_train_epochs", "1",
              "--max_length", str(ml), "--learning_rate", "1e-4", "--gradient_checkpointing", "false",
              "--logging_steps", "10", "--save_strategy", "no", "--report_to", "none", "--output_dir", spec.out,
              "--dataloader_num_workers", "0"]
    kto_flat = spec.method == "kto" and packed
    if spec.method == "kto":
        packed = False
    if packed:
        accumulation = math.ceil((2 if spec.method == "sft" else 3) / world)
        common += ["--packing", "true", "--per_device_train_batch_size", "1", "--packing_length",
                   str(ml if spec.method == "sft" else 2 * ml), "--gradient_accumulation_steps", str(accumulation)]
    else:
        common += ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", str(math.ceil(4 / world))]
        if kto_flat:
            common += ["--padding_free", "true"]
    if deepspeed:
        common += ["--deepspeed", deepspeed]
    if world > 1:
        # torchrun sets OMP_NUM_THREADS=1 per rank: two ranks on two cores, no oversubscription
        launch = [installs.python_for("tunesmith"), "-m", "torch.distributed.run", "--nproc_per_node",
                  str(world), "--master_port", str(free_port()), "-m", "tunesmith"]
    else:
        launch = [installs.python_for("tunesmith"), "-m", "tunesmith"]
    if spec.method == "sft":
        return [*launch, "sft", *common]
    sharing = [] if shared is None or spec.method != "dpo" else ["--prefix_sharing", str(shared).lower()]
    return [*launch, "rlhf", "--rlhf_type", spec.method, *common, *sharing]


def tunesmith_padded_cmd(spec: RunSpec) -> list[str]:
    return tunesmith_cmd(spec, packed=False)


def tunesmith_unshared_cmd(spec: RunSpec) -> list[str]:
    """Packed DPO without prefix sharing (chosen and rejected as two sequences): what sharing the prompt adds."""
    return tunesmith_cmd(spec, shared=False)


def tunesmith_ddp2_cmd(spec: RunSpec) -> list[str]:
    return tunesmith_cmd(spec, world=2)


def tunesmith_zero3_cmd(spec: RunSpec) -> list[str]:
    return tunesmith_cmd(spec, world=2, deepspeed="zero3")


def trl_cmd(spec: RunSpec) -> list[str]:
    return [installs.python_for("trl"), os.path.join(HERE, "peers", "trl_train.py"), spec.method, spec.model,
            spec.data, spec.out, str(spec.max_length)]


def swift_cmd(spec: RunSpec) -> list[str]:
    swift = os.path.join(SWIFT_VENV, "bin", "swift")
    common = ["--model", spec.model, "--model_type", "qwen2", "--template", "qwen2_5", "--dataset", spec.data,
              "--tuner_type", "lora",  # ms-swift 4.x's name for --train_type
              "--lora_rank", "8", "--lora_alpha", "32", "--target_modules", "all-linear",
              "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "4", "--num_train_epochs", "1",
              "--max_length", str(spec.max_length), "--learning_rate", "1e-4", "--gradient_checkpointing", "false",
              "--logging_steps", "10", "--save_strategy", "no", "--report_to", "none", "--output_dir", spec.out,
              "--dataloader_num_workers", "0", "--torch_dtype", "float32", "--split_dataset_ratio", "0",
              # no ModelScope query for a newer version of the model (offline it retries ~7 s before training)
              "--check_model", "false"]
    if spec.method == "sft":
        return [swift, "sft", *common]
    if spec.method == "kto":  # messages + label: ms-swift's own KTO format, no mapping
        return [swift, "rlhf", "--rlhf_type", "kto", *common]
    # DPO and RM pairs: prompt is ms-swift's query; chosen/rejected mapped to its response/rejected_response.
    # --rlhf_type rm makes ms-swift load the model with --task_type seq_cls --num_labels 1 itself.
    return [swift, "rlhf", "--rlhf_type", spec.method, *common,
            "--columns", json.dumps({"chosen": "response", "rejected": "rejected_response"})]


SYSTEMS: dict[str, Callable[[RunSpec], list[str]]] = {
    "tunesmith": tunesmith_cmd, "tunesmith-padded": tunesmith_padded_cmd, "tunesmith-unshared": tunesmith_unshared_cmd,
    "tunesmith-ddp2": tunesmith_ddp2_cmd, "tunesmith-zero3": tunesmith_zero3_cmd, "trl": trl_cmd, "ms-swift": swift_cmd,
}
DEFAULT_SYSTEMS = {  # shape -> systems run when --systems is not given (pick_systems drops those that do not
    # apply: tunesmith-unshared outside DPO)
    "small": "tunesmith,tunesmith-padded,tunesmith-unshared,trl,ms-swift",
    "qwen2.5-0.5b": "tunesmith,trl,ms-swift,tunesmith-ddp2,tunesmith-zero3",
}


VERSIONED = ("torch", "transformers", "peft", "trl", "accelerate", "deepspeed")


def library_versions(swift: bool) -> dict[str, dict[str, str]]:
    """{"tunesmith venv": {package: version}, "TRL venv": {...}, "ms-swift venv": {...}}: the libraries each system
    trains with, read by each system's own interpreter (bench/installs.py; ms-swift from bench/.venv-swift)."""
    code = ("import json, sys; from importlib import metadata as m\n"
            "out = {'python': sys.version.split()[0]}\n"
            "for n in sys.argv[1:]:\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    wanted = {"tunesmith venv": (installs.python_for("tunesmith"), ("tunesmith", *VERSIONED)),
              "TRL venv": (installs.python_for("trl"), VERSIONED)}
    if swift and os.path.exists(os.path.join(SWIFT_VENV, "bin", "python")):
        wanted["ms-swift venv"] = (os.path.join(SWIFT_VENV, "bin", "python"), ("ms-swift", *VERSIONED))
    found = {}
    for name, (python, packages) in wanted.items():
        try:
            got = subprocess.run([python, "-c", code, *packages], capture_output=True, text=True, timeout=120,
                                 check=True)
            found[name] = json.loads(got.stdout)
        except (subprocess.SubprocessError, ValueError) as e:
            found[name] = {"error": f"{type(e).__name__}: {e}"}
    return found


def parse_methods(text: str) -> tuple[str, ...]:
    """`sft`, `dpo`, `kto`, `rm`, `both` (sft,dpo), `all` (all four), or a comma-separated list of these."""
    picked: list[str] = []
    for name in (n.strip() for n in text.split(",")):
        if not name:
            continue
        for m in METHOD_SETS.get(name, (name,)):
            if m not in METHODS:
                raise argparse.ArgumentTypeError(f"unknown method {name!r}; choose from "
                                                 f"{', '.join((*METHODS, *METHOD_SETS))}")
            if m not in picked:
                picked.append(m)
    if not picked:
        raise argparse.ArgumentTypeError("no method given")
    return tuple(picked)


def make_swift_venv() -> None:
    if os.path.exists(os.path.join(SWIFT_VENV, "bin", "swift")):
        return
    subprocess.run([sys.executable, "-m", "venv", SWIFT_VENV], check=True)
    pip = os.path.join(SWIFT_VENV, "bin", "pip")
    subprocess.run([pip, "install", "-q", "torch==2.13.0"], check=True)
    # msgspec: ms-swift 4.6's RL trainers import it (swift/rlhf_trainers/utils.py) but its requirements do not name it
    subprocess.run([pip, "install", "-q", "ms-swift==4.6.0", "msgspec"], check=True)


def pick_systems(names: str, method: str) -> list[str]:
    picked = []
    for name in (n.strip() for n in names.split(",")):
        if not name:
            continue
        if name not in SYSTEMS:
            raise SystemExit(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
        if name == "tunesmith-unshared" and method != "dpo":
            continue
        if name == "ms-swift" and not os.path.exists(os.path.join(SWIFT_VENV, "bin", "swift")):
            print("ms-swift: bench/.venv-swift does not exist (run with --make-swift-venv); skipped", file=sys.stderr)
            continue
        picked.append(name)
    return picked


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--method", type=parse_methods, default=("sft",),
                    help="sft, dpo, kto, rm, both (= sft,dpo), all (= sft,dpo,kto,rm) or a comma-separated list")
    ap.add_argument("--rows", type=int, default=256, help="rows (SFT, KTO) or pairs (DPO, RM)")
    ap.add_argument("--dpo-rows", type=int, default=None, help="pairs for DPO (default --rows)")
    ap.add_argument("--kto-rows", type=int, default=None, help="labelled replies for KTO (default --rows)")
    ap.add_argument("--rm-rows", type=int, default=None, help="pairs for the reward model (default --dpo-rows, "
                                                                "else --rows)")
    ap.add_argument("--max-length", type=int, default=1024, help="tokens per sequence (DPO, RM: per side)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--systems", default=None, help=f"comma-separated from: {', '.join(SYSTEMS)} "
                                                    "(default depends on --shape)")
    ap.add_argument("--peers", default=None, help="(older spelling) comma-separated peers: trl, ms-swift, none")
    ap.add_argument("--make-swift-venv", action="store_true", help="create bench/.venv-swift (ms-swift 4.6)")
    ap.add_argument("--make-user-venvs", action="store_true",
                    help="create bench/.venv-tunesmith and bench/.venv-trl: each system's own install, nothing else "
                         "(bench/installs.py)")
    ap.add_argument("--prompt-words", type=int, default=0, help="median prompt length in words (default: 5-40)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args()

    if a.make_swift_venv:
        make_swift_venv()
    if a.make_user_venvs:
        installs.make_user_venvs()
    shape = SHAPES[a.shape]
    if a.layers:
        shape = Shape(**{**asdict(shape), "layers": a.layers})
    names = a.systems or DEFAULT_SYSTEMS[a.shape]
    if a.peers is not None and a.systems is None:  # keep the tunesmith rows, replace the peers
        names = ",".join([n for n in names.split(",") if n.startswith("tunesmith")] +
                         [p for p in a.peers.split(",") if p.strip() not in ("", "none")])
    work = tempfile.mkdtemp(prefix="tunesmith-bench-")
    model = os.path.join(work, "model")
    which_tok = build_shape_model(model, shape)
    # Replies are capped so that every row fits max_length (the random words are ~1.1 tokens each).
    max_words = min(700, int(0.75 * a.max_length) - 40)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    methods = a.method
    headroom = swift_headroom(model)  # applied whatever --systems: the data depends only on the shape and sizes
    rows_for = {"sft": a.rows, "dpo": a.dpo_rows or a.rows, "kto": a.kto_rows or a.rows,
                "rm": a.rm_rows or a.dpo_rows or a.rows}
    setup = {method: {} for method in methods}
    for method in methods:
        data = os.path.join(work, f"{method}.jsonl")
        rows = rows_for[method]
        systems = pick_systems(names, method)
        words = max_words
        while True:  # shorten the longest replies until every row fits (every system then trains every row)
            make_data(data, rows, method, prompt_words=a.prompt_words, max_words=words)
            tokens, over = dataset_tokens(model, data, method, a.max_length, headroom)
            if not over or words <= 8:
                break
            words = max(8, int(words * 0.9))
        if words != max_words:
            print(f"{method}: replies capped at {words} words (not {max_words}) so that every row fits "
                  f"--max-length {a.max_length}" + (f" with ms-swift's {headroom} more system-prompt tokens"
                                                    if headroom else ""), file=sys.stderr)
        setup[method] = {"data": data, "rows": rows, "tokens": tokens, "over_max_length": over,
                         "max_reply_words": words, "systems": systems}
        if over:
            print(f"warning: {over} {method} rows exceed --max-length {a.max_length}", file=sys.stderr)
    versions = library_versions(any("ms-swift" in setup[m]["systems"] for m in methods))
    for where, found in versions.items():
        print(f"{where}: " + ", ".join(f"{k} {v}" for k, v in found.items()), flush=True)
    for system in ("tunesmith", "trl"):
        print(installs.where(system), flush=True)
    results: dict[str, dict[str, list]] = {m: {n: [] for n in setup[m]["systems"]} for m in methods}
    for rep in range(a.repeats):
        for method in methods:  # every method within a round: all see the same drift
            for name in setup[method]["systems"]:
                out = os.path.join(work, f"{method}-{name}-{rep}")
                spec = RunSpec(method, model, setup[method]["data"], out, a.max_length)
                wall, rss, rc, other = run_measured(SYSTEMS[name](spec), env, out + ".log")
                if rc != 0:
                    print(f"{method} {name} failed (exit {rc}); log: {out}.log", file=sys.stderr)
                    print(open(out + ".log", errors="replace").read()[-3000:], file=sys.stderr)
                    results[method][name].append(None)
                    continue
                loop = train_runtime(out + ".log", out)
                results[method][name].append({"wall_s": wall, "train_s": loop, "peak_rss_gib": rss,
                                              "other_cpu": other})
                tokens = setup[method]["tokens"]
                print(f"  {method} {name:17s} run {rep + 1}: {wall:7.1f} s  {tokens / wall:8.1f} tok/s  "
                      f"train {loop if loop is not None else float('nan'):7.1f} s  peak RSS {rss:.2f} GiB  "
                      f"(other processes used {100 * other:.0f}% of the CPUs)",
                      flush=True)
    params = model_params(shape)
    report = {"shape": asdict(shape), "params": params, "tokenizer": which_tok, "rows": a.rows,
              "max_length": a.max_length, "repeats": a.repeats, "cpus": os.cpu_count(), "versions": versions,
              "methods": {}}
    for method in methods:
        tokens = setup[method]["tokens"]
        unit = {"dpo": "pairs", "rm": "pairs", "kto": "labelled replies"}.get(method, "rows")
        print(f"\n{method}: {setup[method]['rows']} {unit}, {tokens} dataset tokens, 1 epoch, LoRA r8 all-linear, "
              f"max_length {a.max_length}, model {a.shape} ({shape.layers} layers, {params / 1e6:.1f}M params, vocab "
              f"{shape.vocab}), {os.cpu_count()} CPUs")
        print(f"{'system':17s} {'wall s (best)':>14s} {'tok/s':>8s} {'train s':>8s} {'train tok/s':>12s} "
              f"{'peak RSS GiB':>13s} {'other CPU %':>12s}")
        best = {}
        for name, runs in results[method].items():
            ok = [r for r in runs if r]
            if not ok:
                print(f"{name:17s} failed")
                best[name] = None
                continue
            fastest = min(ok, key=lambda r: r["wall_s"])
            best[name] = {**fastest, "peak_rss_gib": max(r["peak_rss_gib"] for r in ok),
                          "tokens_per_s": tokens / fastest["wall_s"],
                          "train_tokens_per_s": tokens / fastest["train_s"] if fastest["train_s"] else None}
            b = best[name]
            print(f"{name:17s} {b['wall_s']:14.1f} {b['tokens_per_s']:8.1f} "
                  f"{b['train_s'] if b['train_s'] is not None else float('nan'):8.1f} "
                  f"{b['train_tokens_per_s'] or float('nan'):12.1f} {b['peak_rss_gib']:13.2f} "
                  f"{100 * b.get('other_cpu', float('nan')):12.0f}")
        ratios = {}
        if best.get("tunesmith"):
            t = best["tunesmith"]
            for name, b in best.items():
                if b and not name.startswith("tunesmith"):
                    ratios[name] = {"throughput": b["wall_s"] / t["wall_s"], "peak_rss": t["peak_rss_gib"] /
                                    b["peak_rss_gib"]}
                    if t["train_s"] and b["train_s"]:
                        ratios[name]["train_loop_throughput"] = b["train_s"] / t["train_s"]
                    print(f"tunesmith/{name}: throughput x{ratios[name]['throughput']:.2f} (train loop "
                          f"x{ratios[name].get('train_loop_throughput', float('nan')):.2f}), peak RSS "
                          f"x{ratios[name]['peak_rss']:.2f}")
        report["methods"][method] = {"rows": setup[method]["rows"], "tokens": tokens,
                                     "over_max_length": setup[method]["over_max_length"],
                                     "runs": results[method], "best": best, "ratios": ratios}
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(report, fh, indent=2)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work directory: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
