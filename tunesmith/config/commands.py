"""What each command takes: its flag groups (tunesmith.config.groups), ms-swift's compatibility groups
(tunesmith.config.swift_compat) and, for data, eval and report, a few flags of its own. Each command's class is a
frozen dataclass composed of its groups, so a parsed command is immutable and `isinstance(args, TrackArgs)` says
what it has.

    command     groups                                                        compatibility only
    sft, pt     Model Quant Template Data Tuner Track Output Optim Dist       SwiftCompat TrainerCompat
                ModelKnob OptimKnob (pt: no chat template, loss_scale all)    TrainGenerationCompat
    rlhf, dpo   sft's, and RLHF GRPO PPO GKD Vllm                             sft's
    infer       Generation InferBackend(Vllm) Checkpoint Model Quant          SwiftCompat
                Template Data
    deploy      infer's, and DeployServer                                     infer's
    rollout     deploy's (ms-swift's RolloutArguments extend DeployArguments)  deploy's
    export      ExportOutput Checkpoint Model Quant Template Generation Data  SwiftCompat
    eval        Eval Generation InferBackend(Vllm) Checkpoint Model Quant     SwiftCompat EvalServerCompat
                Template Track Data; its own --verbose, --report_to
    data        Model Template Data; its own action, output, row, ...
    report      its own runs, output
    web-ui      UIServer WebUIFolder
    app         UIServer App, and deploy's                                    deploy's

Where two groups name the same flag (eval's --max_batch_size, --report_to, --api_key; export's --quant_method
and --quant_bits, the quantisation to write), the first base listed wins,
as Python's method resolution order says. COMMAND_ARGS maps each command name to its class.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from tunesmith.config.groups import (CheckpointArgs, DataArgs, DeployServerArgs, DistArgs, EvalArgs,
                                     ExportOutputArgs, GenerationArgs, InferBackendArgs, ModelArgs, OptimArgs,
                                     OutputArgs, QuantArgs, TemplateArgs, TrackArgs, VllmArgs, _f)
from tunesmith.config.rl_groups import GKDArgs, GRPOArgs, PPOArgs, RLHFArgs
from tunesmith.config.training_groups import ModelKnobArgs, OptimKnobArgs, TunerArgs
from tunesmith.config.groups import AppArgs, UIServerArgs, WebUIFolderArgs  # web-ui and app
from tunesmith.config.swift_compat import (EvalServerCompatArgs, SwiftCompatArgs, TrainerCompatArgs,
                                           TrainGenerationCompatArgs)


@dataclass(frozen=True)
class SftArguments(ModelArgs, QuantArgs, TemplateArgs, DataArgs, TunerArgs, TrackArgs, OutputArgs, OptimArgs,
                   DistArgs, ModelKnobArgs, OptimKnobArgs, SwiftCompatArgs, TrainerCompatArgs,
                   TrainGenerationCompatArgs):
    """`tunesmith sft`."""


@dataclass(frozen=True)
class PretrainArguments(SftArguments):
    """`tunesmith pt`: continued pre-training. sft with ms-swift's PretrainArguments defaults: plain text, no chat
    template, every token trained."""
    use_chat_template: bool = _f(False, help="Render rows with the chat template. pt's default false: each row's "
                                             "text (a .txt line, a `text` field, or a conversation's contents "
                                             "joined) with the tokenizer's own BOS and an EOS, as ms-swift pt.")
    loss_scale: Optional[str] = _f("all", help="pt's default all: every token is trained (default, last_round: "
                                               "only the replies of chat rows).")


@dataclass(frozen=True)
class RLHFArguments(VllmArgs, PPOArgs, GKDArgs, GRPOArgs, RLHFArgs, SftArguments):
    """`tunesmith rlhf` (and `tunesmith dpo`)."""


@dataclass(frozen=True)
class InferArguments(GenerationArgs, InferBackendArgs, CheckpointArgs, ModelArgs, QuantArgs, TemplateArgs, DataArgs,
                     SwiftCompatArgs):
    """`tunesmith infer`: interactive chat, or batch over --val_dataset."""


@dataclass(frozen=True)
class DeployArguments(DeployServerArgs, InferArguments):
    """`tunesmith deploy`: OpenAI-compatible server."""


@dataclass(frozen=True)
class RolloutArguments(DeployArguments):
    """`tunesmith rollout`: ms-swift's rollout protocol (GRPO's --vllm_mode server) on tunesmith's engine; deploy's
    flags (ms-swift's RolloutArguments extend DeployArguments the same way)."""


@dataclass(frozen=True)
class ExportArguments(ExportOutputArgs, CheckpointArgs, ModelArgs, QuantArgs, TemplateArgs, SwiftCompatArgs,
                      GenerationArgs, DataArgs):
    """`tunesmith export`: merge LoRA adapters, write GGUF files and an Ollama Modelfile, or a quantised checkpoint."""


@dataclass(frozen=True)
class EvalArguments(EvalArgs, GenerationArgs, InferBackendArgs, CheckpointArgs, ModelArgs, QuantArgs, TemplateArgs,
                    TrackArgs, SwiftCompatArgs, DataArgs, EvalServerCompatArgs):
    """`tunesmith eval`: benchmarks from local files; the base and the tuned model side by side."""
    verbose: bool = _f(False, help="ms-swift: EvalScope's debug output. The native evaluator prints the same "
                                   "either way.")
    # ms-swift's eval has no --report_to (EvalScope keeps its own reports), so nothing is logged unless asked
    report_to: List[str] = _f(help="Log the score table (each model's score and the delta, per dataset, subset and "
                                   "metric) to tensorboard, swanlab, wandb, mlflow or all, under the eval's output "
                                   "folder. Default none: ms-swift's eval has no --report_to.", list_default=["none"])


@dataclass(frozen=True)
class DataCommandArguments(ModelArgs, TemplateArgs, DataArgs):
    """`tunesmith data ACTION`: inspect, validate, convert, split, stats, cache."""
    action: Optional[str] = _f(help="inspect | validate | convert | split | stats | cache",
                               choices=("inspect", "validate", "convert", "split", "stats", "cache"))
    output: Optional[str] = _f(help="Output file (convert) or folder (split).", aliases=("output_dir",))
    row: int = _f(0, help="inspect: which row to show, 0-based among the usable rows (with --strict false bad rows "
                              "are skipped; each row shown names its file:line).")
    num_rows: Optional[int] = _f(help="inspect: how many rows to show (default 1). stats --streaming true: how "
                                      "many rows to measure, from the start (default 10000).")
    val_ratio: float = _f(0.1, help="split: fraction for validation (default 9:1).")
    clean: bool = _f(False, help="cache: remove the encoded datasets kept for --load_from_cache_file (all of them, "
                                 "or those unused for --older_than_days).")
    older_than_days: Optional[float] = _f(help="cache --clean true: only entries not used for this many days.")
    rlhf: bool = _f(False, help="Treat the data as preference data (chosen/rejected).")
    rlhf_type: Optional[str] = _f(help="The method the data is for (implies --rlhf): dpo, simpo, orpo, cpo or rm "
                                       "need a rejected reply in every row, kto a label or a pair, grpo a prompt "
                                       "(a row ending with the user's turn, or a final reply taken as the solution), "
                                       "gkd a reply (sft's rows, the last reply trained), ppo a prompt (as grpo).",
                                  choices=("dpo", "simpo", "orpo", "cpo", "rm", "kto", "grpo", "ppo", "gkd"))


@dataclass(frozen=True)
class ReportArguments:
    """`tunesmith report RUN_DIR [RUN_DIR ...]`: rebuild a run's plots and report.html, or compare runs."""
    runs: List[str] = _f(help="Run directories (output/<model>/vN-…); also given positionally.", list_default=[])
    output: Optional[str] = _f(help="Comparison report path (default compare_report.html; one run: its report.html).")


@dataclass(frozen=True)
class WebUIArguments(UIServerArgs, WebUIFolderArgs):
    """`tunesmith web-ui`: train, watch, stop, compare, chat and export from a browser."""


@dataclass(frozen=True)
class AppArguments(UIServerArgs, AppArgs, DeployArguments):
    """`tunesmith app`: the chat page alone, for one model or checkpoint."""


COMMAND_ARGS = {"sft": SftArguments, "pt": PretrainArguments, "data": DataCommandArguments, "rlhf": RLHFArguments,
                "dpo": RLHFArguments,
                "infer": InferArguments, "deploy": DeployArguments, "rollout": RolloutArguments,
                "export": ExportArguments,
                "report": ReportArguments, "eval": EvalArguments}
COMMAND_ARGS.update({"web-ui": WebUIArguments, "app": AppArguments})
