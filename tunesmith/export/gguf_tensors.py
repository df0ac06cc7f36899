"""The model half of a GGUF file: which Hugging Face tensor becomes which llama.cpp tensor (names, layouts, the type
each is stored in) and the architecture's key/value metadata, for the families tunesmith writes (Qwen2/Qwen2.5,
Qwen3, Llama 3.x, gpt-oss).

It follows llama.cpp's own converter (convert_hf_to_gguf.py and conversion/{base,llama,qwen,gpt_oss}.py of the
llama.cpp vendored by llama-cpp-python 0.3.36) and the tensors its loader expects (src/models/{qwen2,qwen3,llama,
openai-moe}.cpp); the names come from the `gguf` package's own map (gguf.get_tensor_name_map), never spelled here:
- Llama: q_proj/k_proj rows permuted from Hugging Face's rotate-half RoPE layout to the interleaved one llama.cpp's
  LLAMA rope uses (LlamaModel.permute); a `llama3` rope_scaling becomes the `rope_freqs` tensor
  (LlamaModel.generate_extra_tensors).
- Qwen2 (q/k/v biases) and Qwen3 (q_norm/k_norm) map one to one.
- gpt-oss: the experts' fused `gate_up_proj` [E, hidden, 2*ff] (gate and up interleaved along the last axis, as
  transformers' GptOssExperts._apply_gate reads them: gate = [..., ::2], up = [..., 1::2]) is split into
  `ffn_gate_exps` / `ffn_up_exps` [E, ff, hidden] (biases likewise), `down_proj` [E, ff, hidden] is transposed to
  `ffn_down_exps` [E, hidden, ff], the router becomes `ffn_gate_inp`, `sinks` become `attn_sinks`
  (GptOssModel.modify_tensors), and each layer's sliding/full attention is written as a pattern.
- Tied embeddings: no `output.weight` (llama.cpp falls back to `token_embd`), except for gpt-oss whose loader needs
  one.
- 1-D tensors, norms, biases and the MoE router stay F32 in every file type (ModelBase.prepare_tensors).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

# tunesmith family (config.json model_type) -> llama.cpp architecture name (gguf.MODEL_ARCH_NAMES)
ARCHES = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama", "gpt_oss": "gpt-oss"}
# families whose q/k rows llama.cpp wants interleaved (its LLAMA rope; the others use NEOX rope, HF's own layout)
_PERMUTED = {"llama"}
# gpt-oss's HF expert tensors: source suffix -> [(the name the gguf map knows, operation)]
_GPT_OSS_EXPERTS = {
    "mlp.experts.gate_up_proj": [("mlp.experts.gate_proj.weight", "even_t"), ("mlp.experts.up_proj.weight", "odd_t")],
    "mlp.experts.gate_up_proj_bias": [("mlp.experts.gate_proj.bias", "even"), ("mlp.experts.up_proj.bias", "odd")],
    "mlp.experts.down_proj": [("mlp.experts.down_proj.weight", "t")],
    "mlp.experts.down_proj_bias": [("mlp.experts.down_proj.bias", "copy")],
    "self_attn.sinks": [("self_attn.sinks.weight", "copy")],
}
_SKIPPED = (".rotary_emb.inv_freq",)  # buffers some checkpoints carry; llama.cpp computes them


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the GGUF file: its llama.cpp name, the Hugging Face tensor it is made from (None: computed,
    e.g. rope_freqs), the operation that makes it, its shape in PyTorch/numpy order (ggml's `ne` reversed), and
    whether it stays F32 in every file type."""
    name: str
    source: str | None
    op: str
    shape: tuple[int, ...]
    keep_f32: bool


def rope_params(config: dict) -> dict:
    """config.json's RoPE settings as one dict (rope_type, rope_theta, factor, ...): transformers 5 writes them under
    `rope_parameters`, 4.x as top-level `rope_theta` plus `rope_scaling` (mirrors TextModel.__init__)."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "full_attention" in rope:  # per-layer-type form; llama.cpp takes the full-attention one
        rope = dict(rope["full_attention"])
    rope.setdefault("rope_type", rope.get("type", "default"))
    if "rope_theta" not in rope:
        rope["rope_theta"] = config.get("rope_theta", 10000.0)
    return rope


def head_dim(config: dict) -> int:
    """The attention head size: config's head_dim, else hidden_size / num_attention_heads."""
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _renamed(family: str, hf_name: str) -> list[tuple[str, str]]:
    """[(name for the gguf map, operation)] for one Hugging Face tensor name."""
    if family == "gpt_oss":
        for suffix, outs in _GPT_OSS_EXPERTS.items():
            if hf_name.endswith("." + suffix):
                stem = hf_name[: -len(suffix)]
                return [(stem + new, op) for new, op in outs]
    if family in _PERMUTED and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return [(hf_name, "permute_q")]
    if family in _PERMUTED and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return [(hf_name, "permute_k")]
    return [(hf_name, "copy")]


def _out_shape(shape: tuple[int, ...], op: str) -> tuple[int, ...]:
    if op in ("even", "odd"):
        return (*shape[:-1], shape[-1] // 2)
    if op in ("even_t", "odd_t"):
        return (*shape[:-2], shape[-1] // 2, shape[-2])
    if op == "t":
        return (*shape[:-2], shape[-1], shape[-2])
    return tuple(shape)


def _keeps_f32(name: str, shape: tuple[int, ...]) -> bool:
    """ModelBase.prepare_tensors: 1-D tensors, norms, anything not a `.weight` (biases, 2-D expert biases
    included), and the MoE router (FFN_GATE_INP) stay F32."""
    return len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or \
        ".ffn_gate_inp." in name


def plan_tensors(family: str, config: dict, shapes: dict[str, tuple[int, ...]]) -> list[PlannedTensor]:
    """The GGUF tensors made from a model's tensors (`shapes`: Hugging Face name -> shape), in _file_order. Raises
    ConfigError naming a tensor llama.cpp has no place for (a classifier head, an adapter left unmerged, a
    quantised checkpoint's packed weights)."""
    import gguf

    from tunesmith.errors import ConfigError

    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == ARCHES[family])
    tmap = gguf.get_tensor_name_map(arch, int(config["num_hidden_layers"]))
    tied = bool(config.get("tie_word_embeddings", False))
    plan = _extra_tensors(family, config)
    unknown = []
    for hf_name, shape in shapes.items():
        if hf_name.endswith(_SKIPPED) or (tied and hf_name == "lm_head.weight"):
            continue
        for name, op in _renamed(family, hf_name):
            base, _, suffix = name.rpartition(".")
            mapped = tmap.get_name(base) if suffix in ("weight", "bias") else None
            if mapped is None:
                unknown.append(hf_name)
                break
            out = _out_shape(tuple(shape), op)
            plan.append(PlannedTensor(f"{mapped}.{suffix}", hf_name, op, out, _keeps_f32(f"{mapped}.{suffix}", out)))
    if unknown:
        raise ConfigError(f"the model has tensors llama.cpp's {ARCHES[family]} architecture has no place for: "
                          f"{', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''}; export a plain "
                          f"{family} causal LM (merge LoRA adapters first; a quantised checkpoint cannot be "
                          f"converted)")
    return sorted(_with_output(family, plan), key=_file_order)


def _file_order(p: PlannedTensor) -> tuple:
    """A canonical order, whatever the source's: computed and embedding tensors, then the blocks in turn (by source
    tensor, so that the two halves of gpt-oss's gate_up_proj follow each other), then the output ones."""
    parts = p.name.split(".")
    if parts[0] == "blk":
        return 1, int(parts[1]), p.source or "", p.name
    return (0 if p.source is None or p.name.startswith("token_embd") else 2), 0, p.source or "", p.name


def _with_output(family: str, plan: list[PlannedTensor]) -> list[PlannedTensor]:
    """gpt-oss's loader needs output.weight even when the embeddings are tied: the embedding written twice."""
    names = {p.name for p in plan}
    if family == "gpt_oss" and "output.weight" not in names:
        embd = next(p for p in plan if p.name == "token_embd.weight")
        plan.append(PlannedTensor("output.weight", embd.source, "copy", embd.shape, False))
    return plan


def _extra_tensors(family: str, config: dict) -> list[PlannedTensor]:
    rope = rope_params(config)
    if family == "llama" and rope["rope_type"] == "llama3":
        return [PlannedTensor("rope_freqs.weight", None, "rope_freqs", (head_dim(config) // 2,), True)]
    return []


def llama3_rope_factors(config: dict):
    """The per-frequency factors of Llama 3.1's RoPE scaling, as llama.cpp's `rope_freqs` tensor (float32, shape
    [head_dim/2]): LlamaModel.generate_extra_tensors in llama.cpp's converter (itself from Meta's reference,
    `apply_scaling` in llama/model.py)."""
    import numpy as np

    rope = rope_params(config)
    dim = head_dim(config)
    base = rope.get("rope_theta", 10000.0)
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _permute(w, n_head: int):
    """LlamaModel.permute: rows of each head from [first half | second half] to interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def produce(p: PlannedTensor, load: Callable[[str], object], config: dict):
    """Planned tensor p as a contiguous CPU torch.Tensor of shape p.shape, in its source's dtype (no float32 copy
    of a bf16 model: the file types are made from it one at a time), its source read with load(name)."""
    import torch

    if p.op == "rope_freqs":
        return torch.from_numpy(llama3_rope_factors(config))
    t = load(p.source).detach().to(device="cpu")
    if p.op in ("permute_q", "permute_k"):
        heads = config["num_attention_heads"] if p.op == "permute_q" else \
            config.get("num_key_value_heads") or config["num_attention_heads"]
        t = _permute(t, heads)
    elif p.op in ("even", "odd", "even_t", "odd_t"):
        t = t[..., 0::2] if p.op.startswith("even") else t[..., 1::2]
        if p.op.endswith("_t"):
            t = t.transpose(-1, -2)
    elif p.op == "t":
        t = t.transpose(-1, -2)
    t = t.contiguous()
    assert tuple(t.shape) == p.shape, (p.name, tuple(t.shape), p.shape)
    return t


def add_model_kv(writer, family: str, config: dict, n_vocab: int) -> None:
    """The architecture's key/value metadata through GGUFWriter's add_* methods, as TextModel.set_gguf_parameters
    and the family classes of llama.cpp's converter write them (context/embedding/feed-forward lengths, head counts,
    RoPE base and scaling, RMS epsilon, expert counts, sliding window and its per-layer pattern)."""
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    if config.get("head_dim"):
        writer.add_key_length(int(config["head_dim"]))
        writer.add_value_length(int(config["head_dim"]))
    _add_rope_kv(writer, config)
    if family == "llama":
        writer.add_vocab_size(n_vocab)
        writer.add_rope_dimension_count(head_dim(config))
    if family == "gpt_oss":
        writer.add_expert_count(int(config["num_local_experts"]))
        writer.add_expert_used_count(int(config["num_experts_per_tok"]))
        writer.add_expert_feed_forward_length(int(config["intermediate_size"]))
        writer.add_sliding_window(int(config["sliding_window"]))
        if config.get("layer_types"):
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in config["layer_types"]])


def _add_rope_kv(writer, config: dict) -> None:
    """rope.freq_base and the scaling llama.cpp reads (linear, yarn); llama3 goes into rope_freqs instead."""
    import gguf

    rope = rope_params(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    kind, factor = rope["rope_type"], rope.get("factor")
    if kind == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif kind == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        for key, add in (("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(float(rope[key]))


ROPE_TYPES = ("default", "linear", "yarn", "llama3")  # what the writer above reproduces


def family_config_problem(family: str, config: dict) -> str | None:
    """A setting of a supported family that llama.cpp would not reproduce, as one message, or None: a RoPE scaling
    other than ROPE_TYPES, Qwen's sliding-window layers (llama.cpp's qwen2/qwen3 have none), a gpt-oss SwiGLU
    clamp other than the one llama.cpp hard-codes (alpha 1.702, limit 7.0: LLM_FFN_SWIGLU_OAI_MOE)."""
    kind = rope_params(config)["rope_type"]
    if kind not in ROPE_TYPES:
        return (f"its RoPE scaling {kind!r} is not one llama.cpp's {ARCHES[family]} reads as written here "
                f"({', '.join(ROPE_TYPES)})")
    if family in ("qwen2", "qwen3") and config.get("use_sliding_window"):
        return "it uses sliding-window attention (use_sliding_window: true), which llama.cpp's Qwen models lack"
    if family == "gpt_oss" and (float(config.get("swiglu_limit", 7.0)), float(config.get("swiglu_alpha", 1.702))) \
            != (7.0, 1.702):
        return "its SwiGLU clamp (swiglu_limit/swiglu_alpha) differs from the 7.0/1.702 llama.cpp hard-codes"
    return None
