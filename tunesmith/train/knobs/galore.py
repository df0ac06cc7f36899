"""GaLore (`--use_galore`): full training with AdamW's state kept in a low-rank projection of each gradient.

Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection" (arXiv:2403.03507),
Algorithm 1: for a targeted weight W [m, n] with gradient G, every --galore_update_proj_gap steps P ← the top
--galore_rank singular vectors of G (the smaller side, `proj_type` std); R = PᵀG (or GP) is what Adam sees, and the
update is α·P·Adam(R) (α = --galore_scale), so it lies in the rank-r subspace spanned by P. The optimiser is
galore-torch's GaLoreAdamW (GaLoreAdamW8bit for an 8-bit --optim), over ms-swift's groups
(optimizers/galore/utils.py): one group of the targeted weights with the projection settings, and the usual
decay / no-decay groups for the rest. Each weight's projector lives in the optimiser state, so checkpoints carry it
and a resume is exact.
"""
from __future__ import annotations

from tunesmith.errors import TunesmithError


def galore_targets(model, optim) -> list:
    """The trainable weights GaLore projects: of every nn.Linear whose name contains one of
    --galore_target_modules (default: every Linear but the output layer, ms-swift's find_all_linears), and the
    input embedding with --galore_with_embedding."""
    import torch

    out_layer = model.get_output_embeddings()
    keys = list(optim.galore_target_modules)
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not module.weight.requires_grad:
            continue
        if (keys and any(k in name for k in keys)) or (not keys and module is not out_layer):
            found.append(module.weight)
    embedding = model.get_input_embeddings()
    if optim.galore_with_embedding and embedding.weight.requires_grad and \
            all(embedding.weight is not p for p in found):
        found.append(embedding.weight)
    return found


def _place_projectors(optimizer) -> None:
    """After a checkpoint's state is loaded (mapped to the CPU): each projector's matrices on its weight's device."""
    for p, state in optimizer.state.items():
        proj = state.get("projector")
        if proj is not None and proj.ortho_matrix is not None:
            m = proj.ortho_matrix
            proj.ortho_matrix = [t.to(p.device) for t in m] if isinstance(m, list) else m.to(p.device)


def galore_optimizer(model, optim):
    """GaLoreAdamW (or GaLoreAdamW8bit for an 8-bit --optim) over the GaLore group and the rest. Raises
    TunesmithError when galore-torch is missing or no weight matches --galore_target_modules."""
    from tunesmith.train.param_groups import EIGHT_BIT, decay_groups

    try:
        import galore_torch
    except ImportError:
        raise TunesmithError("--use_galore needs galore-torch: pip install 'tunesmith[galore]'") from None
    targets = galore_targets(model, optim)
    if not targets:
        raise TunesmithError(f"--use_galore: no trainable Linear module matches --galore_target_modules "
                             f"{' '.join(optim.galore_target_modules)}")
    group = {"params": targets, "rank": optim.galore_rank, "update_proj_gap": optim.galore_update_proj_gap,
             "scale": optim.galore_scale, "proj_type": optim.galore_proj_type, "weight_decay": optim.weight_decay}
    groups = [group] + decay_groups(model, optim.weight_decay, skip={id(p) for p in targets})
    kwargs = {"lr": optim.learning_rate, "betas": (optim.adam_beta1, optim.adam_beta2), "eps": optim.adam_epsilon}
    if optim.optim in EIGHT_BIT:
        opt = galore_torch.GaLoreAdamW8bit(groups, optim_bits=8, is_paged="paged" in optim.optim, **kwargs)
    else:
        opt = galore_torch.GaLoreAdamW(groups, no_deprecation_warning=True, **kwargs)
    opt.register_load_state_dict_post_hook(_place_projectors)
    return opt
