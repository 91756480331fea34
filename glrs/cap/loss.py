"""Stage 2's reward: the calibration loss of a model whose target weights a policy sample set."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def calibration_loss(model, ids: torch.Tensor, device: torch.device) -> float:
    """Mean next-token cross-entropy of the batch; logits one sequence at a time (the vocabulary
    projection of a whole batch would be the largest tensor of the step). The logits are the model's own:
    a final logit soft-cap (Gemma's `final_logit_softcapping`) is applied as the model's forward does."""
    ids = ids.to(device, torch.long)
    cap = getattr(model.config, "final_logit_softcapping", None)
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    total = torch.zeros((), dtype=torch.float64, device=device)
    for b in range(ids.shape[0]):
        logits = model.lm_head(hidden[b, :-1]).float()
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        total += F.cross_entropy(logits, ids[b, 1:], reduction="sum").double()
    return float(total) / (ids.shape[0] * (ids.shape[1] - 1))
