"""The tuners of --train_type besides LoRA and full training, under ms-swift 4.x's flag names and defaults
(swift/arguments/tuner_args.py, swift/pipelines/train/tuner.py `prepare_adapter`), built by peft: one function per
tuner turning the model slice (tunesmith.config.slices.ModelConfig) into a peft config (`PEFT_CONFIGS`), and LLaMA-Pro's
block expansion (`expand_blocks`), which ms-swift implements itself and tunesmith writes as a small function over the
transformers model. docs/tuners.md has the table of tuners, flags, defaults and merge support.

LoRA's LoRA-GA start needs the gradients of the first training rows before peft wraps the model (`lora_ga_rows`,
`lora_ga_step`, given to peft's preprocess_loraga by models.load.attach_lora). And what a checkpoint needs beyond
peft's `save_pretrained`: `TRAINING_WEIGHTS`, the trained weights as the training model holds them. peft saves an
AdaLoRA adapter trimmed to the ranks its budget kept, and tunesmith saves a PiSSA, OLoRA or LoRA-GA adapter converted
to a plain LoRA that fits the original base (`initial_adapter`, `save_adapter`: peft's
`path_initial_model_for_weight_conversion`); neither form can be trained on exactly, so resuming reads this file
(`save_training_weights`, `load_training_weights`). Which adapter folders fit which tuner (PEFT_TYPES,
adapter_problem) is models.checkpoint's; AdaLoRA's steps in the loop are train.tuners'.

Only the standard library and tunesmith's errors, log and models.load are imported at module level: the flag
checks read `RESUME_SAME` before torch is imported.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

from tunesmith.errors import ConfigError
from tunesmith.log import note
from tunesmith.models.load import _expand_special, _is_seq_cls, all_linear_names

# --train_type values whose checkpoints hold the whole model (config.json and weights), not an adapter
WHOLE_MODEL = ("full", "llamapro")

# what a resumed run must share with its checkpoint (beyond --train_type): the flags that shape the trained weights
RESUME_SAME = {
    "lora": ("lora_rank", "target_modules", "use_dora", "quant_bits", "modules_to_save", "init_weights",
             "lora_ga_batch_size", "lora_ga_iters", "lora_ga_max_length", "lora_ga_direction", "lora_ga_scale",
             "lora_ga_stable_gamma"),
    "adalora": ("adalora_init_r", "target_modules", "modules_to_save"),
    "vera": ("vera_rank", "vera_projection_prng_key", "target_modules", "modules_to_save"),
    "boft": ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "target_modules", "modules_to_save"),
    "fourierft": ("fourier_n_frequency", "target_modules", "modules_to_save"),
    "bone": ("reft_rank", "init_weights", "target_modules"),
    "llamapro": ("llamapro_num_new_blocks", "llamapro_num_groups"),
    "full": (),
}

# LoRA initialisations (--init_weights) that change the base weights (W - A0 B0 stays in the base): their adapters
# are saved converted to plain LoRA against the initial adapter, so that they fit the original base model
MUTATING_INITS = ("pissa", "olora", "lora_ga", "lora-ga")

TRAINING_WEIGHTS = "training_weights.safetensors"


def _targets(model, cfg) -> object:
    """--target_regex (a regex string, as ms-swift passes it) or --target_modules with all-linear expanded."""
    return cfg.target_regex or _expand_special(model, cfg.target_modules)


def _saved_modules(model, cfg) -> Optional[list]:
    return _expand_special(model, cfg.modules_to_save) or None


def _task(model) -> str:
    """peft's task type: CAUSAL_LM (generation), SEQ_CLS for a reward model (peft then trains its score head)."""
    return "SEQ_CLS" if _is_seq_cls(model) else "CAUSAL_LM"


def _init(value: str):
    """--init_weights as peft takes it: true/false as booleans (ms-swift's strtobool), other names as they are."""
    return {"true": True, "false": False}.get(str(value).lower(), value)


def adalora_config(model, cfg):
    """AdaLoRA (Zhang et al. 2023, https://arxiv.org/abs/2303.10512): SVD-shaped LoRA (P Λ Q) whose ranks start at
    --adalora_init_r and are pruned to an average of --adalora_target_r by importance. total_step is a placeholder
    here (peft requires one); train.tuners sets the run's step count before the first allocation, as ms-swift's
    AdaloraCallback does at on_train_begin."""
    from peft import AdaLoraConfig

    return AdaLoraConfig(target_r=cfg.adalora_target_r, init_r=cfg.adalora_init_r, tinit=cfg.adalora_tinit,
                         tfinal=cfg.adalora_tfinal, deltaT=cfg.adalora_deltaT, beta1=cfg.adalora_beta1,
                         beta2=cfg.adalora_beta2, orth_reg_weight=cfg.adalora_orth_reg_weight,
                         total_step=cfg.adalora_tinit + cfg.adalora_tfinal + 1, rank_pattern=None,
                         target_modules=_targets(model, cfg), lora_alpha=cfg.lora_alpha,
                         lora_dropout=cfg.lora_dropout, bias=cfg.lora_bias, modules_to_save=_saved_modules(model, cfg),
                         use_rslora=cfg.use_rslora, init_lora_weights=_init(cfg.init_weights), task_type=_task(model))


def vera_config(model, cfg):
    """VeRA (Kopiczko et al. 2024, https://arxiv.org/abs/2310.11454): frozen random matrices A, B of rank
    --vera_rank shared by every targeted layer, and per-layer trained scaling vectors d (start --vera_d_initial)
    and b. The targets are cut to the layers of one shape as ms-swift's get_vera_target_modules does."""
    from peft import VeraConfig

    return VeraConfig(r=cfg.vera_rank, target_modules=_one_shape(model, _targets(model, cfg)),
                      projection_prng_key=cfg.vera_projection_prng_key, vera_dropout=cfg.vera_dropout,
                      d_initial=cfg.vera_d_initial, modules_to_save=_saved_modules(model, cfg), task_type=_task(model))


def _one_shape(model, targets):
    """ms-swift's VeRA targets (swift/pipelines/train/tuner.py get_vera_target_modules): when the Linear layers
    whose names contain a target differ in shape, keep the targets naming layers shaped like the first target with
    a `v` in its name (v_proj). A regex is kept as it is. Raises ConfigError when no target names a `v` layer."""
    import torch

    if isinstance(targets, str):
        return targets
    shapes = {name: tuple(m.weight.shape) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and any(t in name for t in targets)}
    if len(set(shapes.values())) <= 1:
        return targets
    v = next((t for t in targets if "v" in t), None)
    if v is None:
        raise ConfigError(f"--train_type vera: the layers of --target_modules {' '.join(targets)} differ in shape, "
                          f"and VeRA's shared random matrices need one shape (ms-swift keeps the layers shaped like "
                          f"v_proj); pass --target_modules of layers with one shape, e.g. k_proj v_proj")
    shape = next(s for name, s in shapes.items() if v in name)
    same = [name for name, s in shapes.items() if s == shape]
    kept = [t for t in targets if any(t in name for name in same)]
    note(f"--train_type vera: VeRA's shared matrices need layers of one shape; targeting {', '.join(kept)} "
         f"(shaped like {v}, as ms-swift does)")
    return kept


def boft_config(model, cfg):
    """BOFT (Liu et al. 2024, https://arxiv.org/abs/2311.06243): each layer's weight rotated by a trained orthogonal
    matrix built from --boft_n_butterfly_factor butterfly factors of blocks of --boft_block_size (or
    --boft_block_num blocks)."""
    from peft import BOFTConfig

    return BOFTConfig(boft_block_size=cfg.boft_block_size, boft_block_num=cfg.boft_block_num,
                      boft_n_butterfly_factor=cfg.boft_n_butterfly_factor, target_modules=_targets(model, cfg),
                      boft_dropout=cfg.boft_dropout, modules_to_save=_saved_modules(model, cfg), task_type=_task(model))


def fourierft_config(model, cfg):
    """FourierFT (Gao et al. 2024, https://arxiv.org/abs/2405.03003): each layer's update is the inverse 2-D Fourier
    transform of --fourier_n_frequency trained spectral coefficients (at fixed random frequencies), times
    --fourier_scaling."""
    from peft import FourierFTConfig

    return FourierFTConfig(n_frequency=cfg.fourier_n_frequency, scaling=cfg.fourier_scaling,
                           target_modules=_targets(model, cfg), modules_to_save=_saved_modules(model, cfg),
                           task_type=_task(model))


def bone_config(model, cfg):
    """Bone (Kang 2024, https://arxiv.org/abs/2409.15371), which peft now calls MiSS: block-wise updates of block
    size --reft_rank (ms-swift reads bone's rank from that flag, default 4); --init_weights bat gives the
    block-affine variant."""
    from peft import MissConfig

    return MissConfig(r=cfg.reft_rank, init_weights=_init(cfg.init_weights), target_modules=_targets(model, cfg),
                      modules_to_save=_saved_modules(model, cfg), task_type=_task(model))


# --train_type -> the function building its peft config from (model, model slice)
PEFT_CONFIGS: dict[str, Callable] = {"adalora": adalora_config, "vera": vera_config, "boft": boft_config,
                                     "fourierft": fourierft_config, "bone": bone_config}


def attach_tuner(model, cfg):
    """The model wrapped with a fresh adapter of --train_type (one of PEFT_CONFIGS), or continuing from --adapters
    (trainable). Raises ConfigError for several --adapters, or a tuner that does not fit the model (peft's reason)."""
    from peft import PeftModel, get_peft_model

    if cfg.adapters:
        if len(cfg.adapters) > 1:
            raise ConfigError("training continues from one adapter; pass a single --adapters path")
        note(f"continuing training from adapter {cfg.adapters[0]}")
        return PeftModel.from_pretrained(model, cfg.adapters[0], is_trainable=True)
    config = PEFT_CONFIGS[cfg.train_type](model, cfg)
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # targets that match nothing, sizes that do not divide, too many frequencies
        raise ConfigError(f"--train_type {cfg.train_type} does not fit this model: {e} (its Linear layers: "
                          f"{', '.join(all_linear_names(model))})") from None


def expand_blocks(model, num_new_blocks: int, num_groups: Optional[int]) -> list[int]:
    """LLaMA-Pro block expansion (Wu et al. 2024, https://arxiv.org/abs/2401.02415), as ms-swift's LLaMAPro does
    (swift/tuners/llamapro.py): the L decoder layers are split into --llamapro_num_groups groups (default
    --llamapro_num_new_blocks) of L / groups layers, and after each group's last layer a copy of it is inserted with
    its attention output (o_proj) and MLP output (down_proj, experts' too) zeroed, so the new block adds nothing to
    the residual stream and the expanded model computes exactly what the original did. Every weight is then frozen
    but the new blocks'. The config (num_hidden_layers, layer_types) and each attention's layer_idx follow the new
    order, so the folder save_pretrained writes loads as an ordinary model. Returns the new blocks' indices. Raises
    ConfigError when L is not a multiple of --llamapro_num_new_blocks (ms-swift's rule) or a block has no o_proj
    or down_proj."""
    import copy

    import torch

    layers = model.get_decoder().layers
    count = len(layers)
    if num_new_blocks < 1 or count % num_new_blocks:
        raise ConfigError(f"--llamapro_num_new_blocks {num_new_blocks}: the model's {count} decoder layers must "
                          f"be a multiple of it (ms-swift's rule); try one of "
                          f"{', '.join(str(d) for d in range(1, count + 1) if count % d == 0)}")
    stride = count // (num_groups or num_new_blocks)
    types = getattr(model.config, "layer_types", None)
    order, new_types, added = [], [], []
    for i, layer in enumerate(layers):
        order.append(layer)
        new_types.append(types[i] if types else None)
        if (i + 1) % stride == 0:
            order.append(_silent_copy(copy.deepcopy(layer)))
            new_types.append(types[i] if types else None)
            added.append(len(order) - 1)
    for i, layer in enumerate(order):
        if hasattr(getattr(layer, "self_attn", None), "layer_idx"):
            layer.self_attn.layer_idx = i
    model.get_decoder().layers = torch.nn.ModuleList(order)
    model.config.num_hidden_layers = len(order)
    if types:
        model.config.layer_types = new_types
    model.requires_grad_(False)
    for i in added:
        order[i].requires_grad_(True)
    return added


def _silent_copy(block):
    """A decoder block with its output projections (o_proj, down_proj: weights and biases) zeroed."""
    import torch

    zeroed = {"o_proj": 0, "down_proj": 0}
    with torch.no_grad():
        for name, p in block.named_parameters():
            part = next((k for k in zeroed if f"{k}." in name or name.endswith(k) or f"{k}_bias" in name), None)
            if part:
                p.zero_()
                zeroed[part] += 1
    missing = [k for k, n in zeroed.items() if not n]
    if missing:
        raise ConfigError(f"--train_type llamapro needs decoder blocks with o_proj and down_proj (ms-swift's rule); "
                          f"this model's have no {' or '.join(missing)}")
    return block


def lora_ga_rows(rows, cfg) -> list:
    """The training rows LoRA-GA estimates its gradients from: the first --lora_ga_batch_size x --lora_ga_iters
    encoded rows (a preference pair's chosen side, a KTO row's sequence), each cut to --lora_ga_max_length tokens.
    rows: data.prepare.Prepared.train_rows (not a stream)."""
    from tunesmith.data.encode import Encoded

    out = []
    for row in rows[:cfg.lora_ga_batch_size * cfg.lora_ga_iters]:
        seq = row if isinstance(row, Encoded) else row[0]
        out.append(Encoded(list(seq.input_ids[:cfg.lora_ga_max_length]), list(seq.labels[:cfg.lora_ga_max_length])))
    return out


def lora_ga_step(model, rows: list, cfg, pad_id: int):
    """LoRA-GA's gradient estimate (Wang et al. 2024, https://arxiv.org/abs/2407.05000) as peft's preprocess_loraga
    takes it: a function of no arguments running the forward and backward passes of the causal-LM loss (mean
    cross-entropy of the trained tokens) over `rows` (from `lora_ga_rows`) in batches of --lora_ga_batch_size; peft
    averages the targeted weights' gradients over the batches. A batch with no trained token is skipped. On a
    machine with a GPU the model is moved there first (the loop would move it anyway)."""
    from functools import partial

    return partial(_gradient_pass, model, rows, cfg.lora_ga_batch_size, pad_id)


def _gradient_pass(model, rows: list, size: int, pad_id: int) -> None:
    import torch

    from tunesmith.data.collate import IGNORE, pad_collate
    from tunesmith.models.load import default_device

    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model.to(default_device())
    device = next(model.parameters()).device
    text = [r for r in rows if not getattr(r, "images", None)]  # the estimate runs text rows only (no pixels here)
    if len(text) < len(rows):
        from tunesmith.log import note

        note(f"--init_weights lora-ga: the gradient estimate uses the {len(text)} text-only rows of the first "
             f"{len(rows)} (rows with images are left out of it)")
    rows = text
    for start in range(0, len(rows), size):
        batch = pad_collate(rows[start:start + size], pad_id)
        if not bool((batch["labels"][:, 1:] != IGNORE).any()):
            continue
        out = model(**{k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")})
        out.loss.backward()


def initial_adapter(model, cfg):
    """For LoRA initialised with PiSSA, OLoRA or LoRA-GA (--init_weights pissa, pissa_niter_N, olora, lora-ga), which
    move A0 B0 out of the base weights: the adapter as initialised, written to a temporary folder (returned as a
    tempfile.TemporaryDirectory, removed when dropped), before any training. Checkpoints are saved converted against
    it (peft's path_initial_model_for_weight_conversion), as a plain LoRA of rank 2r that fits the original base.
    None for every other tuner and initialisation."""
    import tempfile

    if cfg.train_type != "lora" or cfg.adapters or not str(cfg.init_weights).lower().startswith(MUTATING_INITS):
        return None
    folder = tempfile.TemporaryDirectory(prefix="tunesmith-initial-adapter-")
    model.save_pretrained(os.path.join(folder.name, "initial"))
    return folder


def save_adapter(model, path: str, initial=None, **kw) -> None:
    """Save a peft model's trained adapter into `path` as peft writes it, converted against `initial` (from
    `initial_adapter`) when given; kw: save_pretrained's (safe_serialization, state_dict, selected_adapters). The
    model's train/eval modes are as before (peft's conversion leaves it in eval mode: dropout would go off)."""
    import warnings

    if initial is None:
        model.save_pretrained(path, **kw)
        return
    kw["path_initial_model_for_weight_conversion"] = os.path.join(initial.name, "initial")
    modes = [(m, m.training) for m in model.modules()]
    with warnings.catch_warnings():
        # peft loads the initial adapter beside the trained one to convert it, and warns against exactly that
        warnings.filterwarnings("ignore", message=".* changes the base weights of the model", category=UserWarning)
        model.save_pretrained(path, **kw)
    for module, training in modes:  # loading the initial adapter (not trainable) put the whole model in eval mode
        module.training = training


def needs_training_weights(model) -> bool:
    """Whether the adapter peft saves differs from the weights training holds (AdaLoRA trimmed to its kept ranks,
    a PiSSA/OLoRA adapter converted), so that a checkpoint also needs TRAINING_WEIGHTS to resume exactly."""
    config = (getattr(model, "peft_config", None) or {}).get("default")
    if config is None:
        return False
    kind = getattr(config.peft_type, "value", config.peft_type)
    return kind == "ADALORA" or str(getattr(config, "init_lora_weights", "")).lower().startswith(MUTATING_INITS)


def save_training_weights(model, path: str, state_dict=None) -> None:
    """The trainable parameters under their names in `model` (state_dict: the full weights gathered from every rank,
    when DeepSpeed partitions them) as PATH/TRAINING_WEIGHTS (safetensors)."""
    from safetensors.torch import save_file

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    source = state_dict if state_dict is not None else dict(model.named_parameters())
    save_file({n: source[n].detach().contiguous().cpu() for n in names if n in source},
              os.path.join(path, TRAINING_WEIGHTS), metadata={"format": "pt"})


def load_training_weights(model, path: str) -> None:
    """TRAINING_WEIGHTS of the checkpoint folder `path` into `model` in place. Raises RuntimeError when they do not
    cover the model's trainable parameters or name parameters it lacks."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(path, TRAINING_WEIGHTS))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = trainable - set(state), set(state) - dict(model.named_parameters()).keys()
    if missing or unexpected:
        raise RuntimeError(f"{TRAINING_WEIGHTS} does not match the model (missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]})")
    model.load_state_dict(state, strict=False)
