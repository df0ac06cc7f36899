"""How many sequences the built-in engine runs at once, sized from the memory it has and the model it serves
(`--max_batch_size auto`, the default), and the KV-cache budget that admits each new request.

What lives here: the sizing itself, one pure function over numbers (`plan_batch`: a `ModelShape`, the `Memory`
available, the flag), the two readings it needs from the live process (`model_shape`: the model's config and dtype;
`measure_memory`: CUDA's free memory, or the machine's available RAM), and the start-up line that says what was
chosen and why (`BatchPlan.describe`). The engine (tunesmith.inference.engine) admits a queued request only while
`BatchPlan.fits` says the batch's KV cache, every row at its longest, stays within the budget.

The model of memory, in bytes (GiB = 2**30 bytes):

- KV cache: 2 (keys, values) × layers × KV heads × head dim × dtype bytes per token of each row. The engine keeps
  one left-padded cache ([rows, heads, width, dim] per layer), so a batch costs rows × its longest row: the
  admission check uses each row's longest, prompt + max_new_tokens (capped at the context length), so a batch
  admitted never outgrows the budget later, however long its rows run.
- Per step, per row: the last position's logits, in the model's dtype and as float32 (vocabulary × (dtype + 4)
  bytes; 0.9 MB at Qwen2.5's 151,936 rows in bf16), reserved for every row the plan allows.
- Once: the activations of a prefill batch of up to `prefill_tokens` tokens (hidden and MLP states of one layer at
  a time: (4 × hidden + 3 × intermediate) × dtype bytes per token), reserved off the top.
- Usable memory: on CUDA, the free memory (plus what torch's allocator holds unused) less the (1 -
  --gpu_memory_utilization) share of the GPU that stays free, as vLLM leaves it; on the CPU (and Apple's unified
  memory), `CPU_MEMORY_FRACTION` of the RAM the kernel reports available (MemAvailable). The weights are loaded
  before the engine sizes itself, so what they take is already gone from both.

Rows: at most `ROW_CAP` (256, vLLM's default max_num_seqs) or `--max_batch_size N`, and no more than memory gives
each a `MIN_ROW_TOKENS`-token share of KV cache besides its per-step logits; -1 lifts the cap, never the memory
limit. Where memory cannot be read, the engine runs `UNKNOWN_MEMORY_ROWS` rows (the fixed default tunesmith had
before) without a budget, and says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

ROW_CAP = 256                 # sequences in flight by default at most: vLLM's max_num_seqs
MIN_ROW_TOKENS = 256          # tokens of KV cache memory must leave each row the plan counts
CPU_MEMORY_FRACTION = 0.5     # share of the RAM the kernel reports available that the CPU engine plans with
UNKNOWN_MEMORY_ROWS = 32      # rows when memory cannot be read (no budget then)
GIB = 2 ** 30


@dataclass(frozen=True)
class ModelShape:
    """What a model's memory per token depends on, from its config: decoder layers, KV heads, head dim, hidden and
    MLP widths, vocabulary rows, and the bytes of its compute dtype (2 for bf16/fp16, 4 for fp32)."""
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    dtype_bytes: int

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes of one token of one row, every layer, keys and values."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def row_step_bytes(self) -> int:
        """Bytes one row takes for a decoding step's logits: vocabulary × (model dtype + a float32 copy)."""
        return self.vocab * (self.dtype_bytes + 4)

    @classmethod
    def from_config(cls, config, dtype_bytes: int) -> Optional["ModelShape"]:
        """From a transformers config (its text config for a multimodal one); None when it lacks the layer count,
        the hidden size, the attention heads or the vocabulary size."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        get = lambda name: getattr(text, name, None)  # noqa: E731
        layers, hidden, heads, vocab = get("num_hidden_layers"), get("hidden_size"), get("num_attention_heads"), \
            get("vocab_size")
        if not all(isinstance(v, int) and v > 0 for v in (layers, hidden, heads, vocab)):
            return None
        return cls(layers=layers, kv_heads=get("num_key_value_heads") or heads,
                   head_dim=get("head_dim") or hidden // heads, hidden=hidden,
                   intermediate=get("intermediate_size") or 4 * hidden, vocab=vocab, dtype_bytes=int(dtype_bytes))


@dataclass(frozen=True)
class Memory:
    """Memory the engine may plan with: `available` bytes as read (`where` says what was read), of which `reserved`
    bytes stay untouched (CUDA: the 1 - --gpu_memory_utilization share of the GPU) and `fraction` is used."""
    available: int
    where: str
    fraction: float = 1.0
    reserved: int = 0

    @property
    def usable(self) -> int:
        """Bytes the plan may fill: (available - reserved) × fraction, never below 0."""
        return max(0, int((self.available - self.reserved) * self.fraction))


@dataclass(frozen=True)
class BatchPlan:
    """What the engine runs: at most `max_rows` sequences in flight, and new ones admitted only while the batch's
    KV cache at its longest fits `kv_budget` bytes (None: no budget, memory unknown). The other fields say why, for
    the start-up line: the model's `kv_bytes_per_token` and `row_step_bytes`, the `reserve` for prefill activations
    (bytes), the `memory` read, the flag's `cap` (None: auto, -1: no cap), what limited the rows (`limited_by`:
    "cap", "flag", "memory" or "unknown"), and the context length in tokens."""
    max_rows: int
    kv_budget: Optional[int]
    kv_bytes_per_token: int
    row_step_bytes: int
    reserve: int
    memory: Optional[Memory]
    cap: Optional[int]
    limited_by: str
    context: int

    def fits(self, rows: int, longest: int) -> bool:
        """Whether `rows` sequences whose longest is `longest` tokens (prompt + max_new_tokens) fit the KV budget:
        the left-padded cache holds rows × longest tokens."""
        return self.kv_budget is None or rows * longest * self.kv_bytes_per_token <= self.kv_budget

    def tokens_per_row(self, rows: int) -> int:
        """Tokens each of `rows` sequences may hold within the budget (0 without a budget)."""
        if self.kv_budget is None or not self.kv_bytes_per_token:
            return 0
        return self.kv_budget // (max(1, rows) * self.kv_bytes_per_token)

    def describe(self) -> str:
        """The start-up line: what was chosen, from what, and the flag that changes it."""
        flag = "--max_batch_size auto" if self.cap is None else f"--max_batch_size {self.cap}"
        if self.kv_budget is None:
            return (f"batch: up to {_seqs(self.max_rows)} in flight ({flag}; this machine's free memory could not be "
                    f"read, so no KV-cache budget; --max_batch_size N sets the number)")
        m = self.memory
        source = (f"{m.fraction:g} × {m.available / GIB:.1f} GiB {m.where}" if not m.reserved else
                  f"{m.available / GIB:.1f} GiB {m.where} less {m.reserved / GIB:.1f} GiB kept free, "
                  f"--gpu_memory_utilization")
        why = {"cap": f"the {ROW_CAP}-sequence cap", "flag": "the flag"}.get(self.limited_by, "memory")
        full = self.kv_budget // max(1, self.context * self.kv_bytes_per_token)
        at_full = (f"{_seqs(full)} at the full {self.context:,}-token context" if full else
                   f"a request of the full {self.context:,}-token context runs alone")
        return (f"batch: up to {_seqs(self.max_rows)} in flight ({flag}, limited by {why}); KV-cache budget "
                f"{self.kv_budget / GIB:.1f} GiB of {m.usable / GIB:.1f} GiB usable ({source}), "
                f"{_kib(self.kv_bytes_per_token)} per token: {self.tokens_per_row(self.max_rows):,} tokens each for "
                f"{_seqs(self.max_rows)}, {at_full}; a request joins while the batch fits; --max_batch_size N caps "
                f"the sequences")


def plan_batch(shape: Optional[ModelShape], memory: Optional[Memory], cap: Optional[int], context: int,
               prefill_tokens: int) -> BatchPlan:
    """The batch the engine runs: rows in flight and the KV-cache budget (bytes), from the model's shape, the
    memory usable (`memory.usable` bytes), the flag (`cap`: None = auto, up to ROW_CAP; N ≥ 1 = at most N; -1 = no
    cap but memory) and the context length (`context` tokens, for the start-up line). Pure: numbers in, a
    BatchPlan out.

    rows = min(cap, (usable - reserve) // (row_step_bytes + MIN_ROW_TOKENS × kv_bytes_per_token)), at least 1;
    kv_budget = usable - reserve - rows × row_step_bytes (at least 0: a request alone always runs), where reserve
    = prefill_tokens × (4 × hidden + 3 × intermediate) × dtype bytes. Without a shape or a memory reading: the
    cap (UNKNOWN_MEMORY_ROWS for auto) and no budget."""
    limit = ROW_CAP if cap is None else None if cap <= 0 else cap
    if shape is None or memory is None:
        rows = UNKNOWN_MEMORY_ROWS if cap is None else limit or 1 << 30
        return BatchPlan(rows, None, 0, 0, 0, memory, cap, "unknown", context)
    kv_tok, row_step = shape.kv_bytes_per_token, shape.row_step_bytes
    reserve = prefill_tokens * (4 * shape.hidden + 3 * shape.intermediate) * shape.dtype_bytes
    room = max(0, memory.usable - reserve)
    by_memory = max(1, room // (row_step + MIN_ROW_TOKENS * kv_tok))
    if limit is not None and limit <= by_memory:
        rows, limited_by = limit, "cap" if cap is None else "flag"
    else:
        rows, limited_by = by_memory, "memory"
    budget = max(0, room - rows * row_step)
    return BatchPlan(rows, budget, kv_tok, row_step, reserve, memory, cap, limited_by, context)


def model_shape(model) -> Optional[ModelShape]:
    """The ModelShape of a loaded model (a transformers model, or a peft one over it): its config, and the dtype of
    its first floating-point parameter (the dtype its KV cache is kept in). None when the config says too little."""
    config = getattr(model, "config", None)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if config is None or dtype is None:
        return None
    return ModelShape.from_config(config, dtype.itemsize)


def measure_memory(device, gpu_memory_utilization: float) -> Optional[Memory]:
    """The memory the engine may plan with on `device` (a torch.device): on CUDA, the free memory (torch's
    mem_get_info, plus what its caching allocator holds unused), keeping (1 - gpu_memory_utilization) of the
    GPU's total free; elsewhere, CPU_MEMORY_FRACTION of the RAM available (/proc/meminfo's MemAvailable, else
    psutil's reading). None when it cannot be read."""
    import torch

    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return Memory(free + cached, f"free on {device}", 1.0, int((1 - gpu_memory_utilization) * total))
    available = _ram_available()
    return None if available is None else Memory(available, "RAM available", CPU_MEMORY_FRACTION)


def _ram_available() -> Optional[int]:
    """Bytes of RAM the kernel reports available (MemAvailable of /proc/meminfo), else psutil's
    virtual_memory().available where psutil is installed; None when neither answers."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - not installed, or no reading on this system: memory unknown
        return None


def _seqs(n: int) -> str:
    """"1 sequence", "256 sequences", "any number of sequences" (no cap, memory unknown)."""
    if n >= 1 << 30:
        return "any number of sequences"
    return f"{n:,} sequence" + ("" if n == 1 else "s")


def _kib(n: int) -> str:
    """Bytes as KiB (or MiB from 1 MiB on), for the start-up line."""
    return f"{n / 2 ** 20:.1f} MiB" if n >= 2 ** 20 else f"{n / 1024:g} KiB"
