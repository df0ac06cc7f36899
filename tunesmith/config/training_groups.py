"""The flag groups of training's tuners and knobs: --train_type and each tuner's flags (TunerArgs), ms-swift's
model-side training knobs (ModelKnobArgs: partial full fine-tuning, NEFTune, torch.compile) and optimiser-side ones
(OptimKnobArgs: LoRA+, GaLore, LISA, Muon). Frozen dataclasses like those of tunesmith.config.groups, with the
same `_f`; only the standard library is imported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from tunesmith.config.groups import _f


@dataclass(frozen=True)
class TunerArgs:
    """What is trained: LoRA (rank, alpha, targets, DoRA, rsLoRA, init), another peft tuner (AdaLoRA, VeRA, BOFT,
    FourierFT, Bone), LLaMA-Pro's new blocks, or every weight; adapters to start from. The tuners' flags are
    ms-swift 4.x's names with its defaults (swift/arguments/tuner_args.py); docs/tuners.md has the table."""
    train_type: str = _f("lora", help="lora, full, or the tuners adalora, vera, boft, fourierft, bone (peft) and "
                                      "llamapro (new decoder blocks); see docs/tuners.md.",
                         aliases=("tuner_type", "sft_type"),
                         choices=("lora", "full", "adalora", "vera", "boft", "fourierft", "bone", "llamapro"))
    lora_rank: int = _f(8, help="LoRA rank r (inner dimension of the A and B matrices).")
    lora_alpha: int = _f(32, help="LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with "
                                  "--use_rslora).")
    lora_dropout: float = _f(0.05, help="Dropout probability (0-1) on the LoRA branch's input.")
    lora_bias: str = _f("none", help="none, or all: also train every bias of the model (saved with the adapter).",
                        choices=("none", "all"))
    lora_dtype: Optional[str] = _f(help="dtype of the trained LoRA weights (A, B; DoRA magnitude), cast after the "
                                        "adapter is built. Default: peft's, float32 on a float16/bfloat16 base.",
                                   choices=("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"))
    use_rslora: bool = _f(False, help="Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r.")
    use_dora: bool = _f(False, help="DoRA: learn each weight's magnitude apart from its direction (slower).")
    init_weights: str = _f("true", help="LoRA's initialisation (peft init_lora_weights): true (B = 0), false, "
                                        "gaussian, orthogonal, pissa, pissa_niter_N, olora, lora-ga; bone: true, "
                                        "false or bat.")
    # LoRA-GA (--init_weights lora-ga): LoRA started from the gradients of the first training rows
    lora_ga_batch_size: int = _f(2, help="LoRA-GA: rows per batch of the gradient estimate.")
    lora_ga_iters: int = _f(2, help="LoRA-GA: batches the gradient is averaged over (the first batch_size x iters "
                                    "training rows).")
    lora_ga_max_length: int = _f(1024, help="LoRA-GA: tokens each row is cut to for the gradient estimate.")
    lora_ga_direction: str = _f("ArB2r", help="LoRA-GA: which singular vectors of the gradient A and B take "
                                              "(ArB2r: A the first r, B the next r).",
                                choices=("ArBr", "A2rBr", "ArB2r", "random"))
    lora_ga_scale: str = _f("stable", help="LoRA-GA: how the start is scaled: stable (by --lora_ga_stable_gamma), "
                                           "gd, unit or weightS.", choices=("stable", "gd", "unit", "weightS"))
    lora_ga_stable_gamma: int = _f(16, help="LoRA-GA: gamma of the stable scaling.")
    target_modules: List[str] = _f(help="all-linear (no lm_head, no MoE routers) or module names.",
                                   list_default=["all-linear"])
    target_regex: Optional[str] = _f(help="Regex over module names (overrides --target_modules).")
    target_parameters: List[str] = _f(help="Parameter names for LoRA on raw parameters (MoE experts).",
                                      list_default=[])
    modules_to_save: List[str] = _f(help="Modules trained fully and saved with the adapter (all-embedding, all-norm).",
                                    list_default=[])
    adapters: List[str] = _f(help="Adapter checkpoints to start from (weights only).", list_default=[])
    gradient_checkpointing: bool = _f(True, help="Recompute activations in the backward pass: less memory, "
                                                 "about 30% slower.")
    use_liger_kernel: bool = _f(False, help="Liger fused kernels (GPU only; skipped with a note on CPU).")
    router_aux_loss_coef: float = _f(0.0, help="MoE load-balancing loss weight (gpt-oss example: 1e-3).")
    # AdaLoRA (--train_type adalora; also reads --lora_alpha, --lora_dropout, --target_modules, --init_weights)
    adalora_target_r: int = _f(8, help="AdaLoRA: the average rank left per matrix once the budget is allocated.")
    adalora_init_r: int = _f(12, help="AdaLoRA: every matrix's rank at the start.")
    adalora_tinit: int = _f(0, help="AdaLoRA: optimiser steps of warm-up before ranks are pruned.")
    adalora_tfinal: int = _f(0, help="AdaLoRA: optimiser steps at the end trained with the final ranks.")
    adalora_deltaT: int = _f(1, help="AdaLoRA: optimiser steps between two budget allocations.")
    adalora_beta1: float = _f(0.85, help="AdaLoRA: EMA factor of the sensitivity (importance) scores.")
    adalora_beta2: float = _f(0.85, help="AdaLoRA: EMA factor of the scores' uncertainty.")
    adalora_orth_reg_weight: float = _f(0.5, help="AdaLoRA: weight of the orthogonality penalty on P and Q, added to "
                                                  "the loss.")
    # VeRA (--train_type vera)
    vera_rank: int = _f(256, help="VeRA: rank of the shared frozen random matrices.")
    vera_projection_prng_key: int = _f(0, help="VeRA: seed of the shared random projections (saved with the "
                                               "adapter).")
    vera_dropout: float = _f(0.0, help="VeRA: dropout probability (0-1) on the adapter's input.")
    vera_d_initial: float = _f(0.1, help="VeRA: initial value of the trained scaling vector d.")
    # BOFT (--train_type boft)
    boft_block_size: int = _f(4, help="BOFT: size of each orthogonal block (divides every targeted layer's input "
                                      "size); give it or --boft_block_num, not both.")
    boft_block_num: int = _f(0, help="BOFT: number of orthogonal blocks per layer (0: from --boft_block_size).")
    boft_n_butterfly_factor: int = _f(1, help="BOFT: butterfly factors (1 is OFT's block-diagonal matrix).")
    boft_dropout: float = _f(0.0, help="BOFT: multiplicative dropout probability (0-1) of whole blocks.")
    # FourierFT (--train_type fourierft)
    fourier_n_frequency: int = _f(2000, help="FourierFT: spectral coefficients trained per layer (at most the "
                                             "layer's in x out size).")
    fourier_scaling: float = _f(300.0, help="FourierFT: scaling of the weight update built from the spectrum.")
    # Bone (--train_type bone; peft calls it MiSS): ms-swift reads its rank from --reft_rank
    reft_rank: int = _f(4, help="Bone: block size (rank); ms-swift reads bone's rank from this flag (--train_type "
                                "reft itself is not supported).")
    # LLaMA-Pro (--train_type llamapro): block expansion, https://arxiv.org/abs/2401.02415
    llamapro_num_new_blocks: int = _f(4, help="LLaMA-Pro: new decoder blocks, each a copy of the block before it "
                                             "with its o_proj and down_proj zeroed; only these are trained.")
    llamapro_num_groups: Optional[int] = _f(help="LLaMA-Pro: groups the layers are split into, a new block after "
                                                 "each (default --llamapro_num_new_blocks).")


# ---- ms-swift's training knobs (issue #32): what is trained and how it is stepped, beyond the tuner and the
# optimiser's own flags. Read by models/load.py and train/setup.py (ModelKnobArgs), train/optim.py,
# train/knobs/, train/microbatches.py and the SFT method (OptimKnobArgs).

@dataclass(frozen=True)
class ModelKnobArgs:
    """Which weights of a full fine-tune train, the embeddings' noise, compilation: ms-swift's partial full
    fine-tuning (--freeze_parameters ...), NEFTune and --torch_compile."""
    freeze_parameters: List[str] = _f(help="--train_type full: freeze the parameters whose names start with these "
                                           "prefixes (e.g. model.embed_tokens lm_head).", list_default=[])
    freeze_parameters_regex: Optional[str] = _f(help="--train_type full: freeze the parameters whose names match "
                                                     "this regex (re.search).")
    freeze_parameters_ratio: float = _f(0.0, help="--train_type full: freeze this fraction (0-1) of the parameters, "
                                                  "counted in elements from the bottom (embeddings first) up.")
    trainable_parameters: List[str] = _f(help="--train_type full: after freezing, train again the parameters whose "
                                              "names start with these prefixes.", list_default=[])
    trainable_parameters_regex: Optional[str] = _f(help="--train_type full: after freezing, train again the "
                                                        "parameters whose names match this regex.")
    neftune_noise_alpha: Optional[float] = _f(help="NEFTune (Jain et al. 2023): add uniform noise of scale "
                                                   "alpha / sqrt(L·d) to the input embeddings in training (L tokens, "
                                                   "d hidden size); 5 is usual. Default none.")
    torch_compile: bool = _f(False, help="Compile each decoder layer with torch.compile (the first steps are slower "
                                         "while it compiles).")
    torch_compile_backend: Optional[str] = _f(help="--torch_compile: torch.compile's backend (default inductor).")
    torch_compile_mode: Optional[str] = _f(help="--torch_compile: torch.compile's mode (default, reduce-overhead, "
                                                "max-autotune, ...).")
    # vision-language models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): ms-swift's defaults (swift/arguments/tuner_args.py)
    freeze_vit: bool = _f(True, help="Vision-language models: keep the vision tower frozen (full training), and "
                                     "without LoRA (all-linear).")
    freeze_aligner: bool = _f(True, help="Vision-language models: keep the aligner (the vision-to-text merger) "
                                         "frozen (full training), and without LoRA (all-linear).")
    freeze_llm: bool = _f(False, help="Vision-language models: keep the language model frozen (full training), "
                                      "and without LoRA (all-linear).")
    vit_gradient_checkpointing: Optional[bool] = _f(help="Vision-language models: gradient checkpointing in the "
                                                         "vision tower (default: as --gradient_checkpointing).")


@dataclass(frozen=True)
class OptimKnobArgs:
    """The optimiser plugins (LoRA+, GaLore, Muon), LISA's layer sampling, length-grouped batches and the loss
    variants (DFT, per-channel losses): ms-swift's trainer flags."""
    vit_lr: Optional[float] = _f(help="Vision-language models: the vision tower's learning rate (default "
                                      "--learning_rate); ms-swift's multimodal optimiser.")
    aligner_lr: Optional[float] = _f(help="Vision-language models: the aligner's learning rate (default "
                                          "--learning_rate).")
    optimizer: Optional[str] = _f(help="ms-swift's optimiser plugin: muon (Muon on the 2-D hidden weights, AdamW on "
                                       "the rest), galore (as --use_galore true), lorap (as --lorap_lr_ratio) or "
                                       "default. Takes priority over --optim.",
                                  choices=("default", "muon", "galore", "lorap", "multimodal"))
    optim_args: Optional[str] = _f(help="--optimizer muon: 'momentum=0.95,ns_steps=5,nesterov=true' (Muon's own "
                                        "settings).")
    lorap_lr_ratio: Optional[float] = _f(help="LoRA+ (Hayou et al. 2024): the LoRA B matrices learn at "
                                              "--learning_rate x this ratio (16 is usual). LoRA only.")
    use_galore: bool = _f(False, help="GaLore (Zhao et al. 2024): AdamW on a rank --galore_rank projection of each "
                                      "targeted weight's gradient (galore-torch). Full training only.")
    galore_target_modules: List[str] = _f(help="--use_galore: the Linear modules whose names contain one of these "
                                               "(default: every Linear but the output layer).", list_default=[])
    galore_rank: int = _f(128, help="--use_galore: rank r of the gradient projection.")
    galore_update_proj_gap: int = _f(50, help="--use_galore: optimiser steps between recomputing the projection "
                                              "(an SVD of the gradient).")
    galore_scale: float = _f(1.0, help="--use_galore: the projected-back update is multiplied by this.")
    galore_proj_type: str = _f("std", help="--use_galore: which side is projected (galore-torch's proj_type).",
                               choices=("std", "reverse_std", "right", "left", "full"))
    galore_optim_per_parameter: bool = _f(False, help="ms-swift: one optimiser per parameter. Compatibility only "
                                                      "(see the table at the end).", choices=(False,))
    galore_with_embedding: bool = _f(False, help="--use_galore: also project the input embedding's gradient.")
    lisa_activated_layers: int = _f(0, help="LISA (Pan et al. 2024): train only this many decoder layers at a time, "
                                            "drawn at random (seeded by --seed) every --lisa_step_interval steps; "
                                            "the embeddings, norms and output layer always train. 0: off. Full "
                                            "training only.")
    lisa_step_interval: int = _f(20, help="--lisa_activated_layers: optimiser steps between new draws of the "
                                          "trained layers.")
    group_by_length: bool = _f(False, help="Batch rows of similar length together (with a random factor, seeded: "
                                           "transformers' length-grouped order), so less of each batch is padding.")
    enable_dft_loss: bool = _f(False, help="DFT (Wu et al. 2025, arXiv:2508.05629): weight each token's "
                                           "cross-entropy by its predicted probability (detached). sft and pt only.")
    enable_channel_loss: bool = _f(False, help="Log the loss per channel: rows with a `channel` field are "
                                               "averaged per channel as loss_<channel> (training and validation). "
                                               "sft and pt only.")
