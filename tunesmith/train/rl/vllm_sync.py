"""GRPO's rollouts through vLLM in the training process (ms-swift's --vllm_mode colocate with --vllm_enable_lora):
the engine's settings for the log-probs the rollout correction reads (`processed_logprobs_config`), and `VllmSync`,
which hands vLLM the policy's LoRA adapter before each round. The rounds live in rollouts.py.
"""
from __future__ import annotations

import os
from typing import Optional



def processed_logprobs_config(engine_cfg):
    """The vLLM engine config with logprobs_mode "processed_logprobs" (vLLM ≥ 0.10.2, as ms-swift's GRPO rollouts):
    returned log-probs are of the distribution sampled from (temperature and the other processors applied), the one
    the training forward's log-probs are compared with."""
    from dataclasses import replace

    extra = dict(engine_cfg.vllm_engine_kwargs or {})
    extra.setdefault("logprobs_mode", "processed_logprobs")
    return replace(engine_cfg, vllm_engine_kwargs=extra)


class VllmSync:
    """GRPO's rollouts through vLLM in the training process (ms-swift's --vllm_mode colocate with
    --vllm_enable_lora): vLLM holds the base model; before each round the policy's LoRA adapter is saved to a
    temporary folder and served under a new adapter id, so every round samples from the weights it starts from.

    The engine is tunesmith.inference.backends.VllmEngine (the one `--infer_backend vllm` serves with), built from the
    --vllm_* flags; its folders are removed when the round after has its own, and the last at exit."""

    def __init__(self, model, cfg, model_dir: str):
        import atexit
        import tempfile

        from tunesmith.config.slices import EngineConfig, take

        self.model, self.engine_cfg, self.model_dir = model, take(EngineConfig, cfg.args), model_dir
        self.root = tempfile.mkdtemp(prefix="tunesmith-vllm-lora-")
        self.engine = None
        self.current: Optional[str] = None
        self.weights: Optional[tuple] = None  # what the current adapter was saved from
        self.synced = 0
        atexit.register(self.close)

    def _save(self, n: int) -> tuple[str, str]:
        name = f"policy-{n}" if n >= 0 else "policy-initial"
        path = os.path.join(self.root, name)
        self.model.save_pretrained(path, selected_adapters=["default"], safe_serialization=True)
        return name, path

    def chat(self, tokenizer, cfg, context: Optional[int]):
        """A ChatEngine over a VllmEngine that starts with the policy's adapter as it is now; context: tokens
        (prompt + completion) when --max_length bounds the prompts."""
        from tunesmith.inference.backends import VllmEngine
        from tunesmith.inference.chat import ChatEngine, stop_token_ids
        from tunesmith.data.encode import ChatEncoder
        from tunesmith.inference.reply import OutputParser

        name, path = self._save(-1)  # vLLM starts with LoRA on; each round then brings its own adapter
        stop = stop_token_ids(self.model, tokenizer, ChatEncoder(tokenizer, system=cfg.data.system),
                              OutputParser(tokenizer).reasoning_style)
        self.engine = VllmEngine(self.engine_cfg, self.model_dir, tokenizer, stop, {name: path}, max_model_len=context)
        self.current = name
        return ChatEngine(None, tokenizer, system=cfg.data.system, engine=self.engine,
                          generation_config=getattr(self.model, "generation_config", None),
                          config=getattr(self.model, "config", None))

    def sync(self, weights: tuple) -> str:
        """Hand the policy's current adapter to vLLM, once per state of the weights (`weights`: ("round", r) for a
        training round — its dynamic-sampling prompts included — or ("eval", n)); returns the adapter name to
        request. Saved afresh for each: a resumed run's first round must not sample from the weights the engine
        was built with."""
        import shutil

        if weights == self.weights:
            return self.current
        self.synced += 1
        name, path = self._save(self.synced)
        self.engine.add_adapter(name, path)
        if self.current not in (None, name):
            self.engine.remove_adapter(self.current)
            shutil.rmtree(os.path.join(self.root, self.current), ignore_errors=True)
        self.current, self.weights = name, weights
        return name

    def close(self) -> None:
        """Shut vLLM down and remove the adapter folders."""
        import shutil

        if self.engine is not None:
            self.engine.close()
            self.engine = None
        shutil.rmtree(self.root, ignore_errors=True)
