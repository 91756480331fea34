"""Perplexity by the protocol of Wanda and SparseGPT (docs/design.md section 7).

The evaluation text is joined, tokenised once and cut into non-overlapping
windows of `seqlen` tokens (the model's context if smaller); the last partial
window is dropped. Each window's mean next-token NLL is weighted by seqlen, as
in the reference code, and ppl = exp(total / (windows * seqlen)).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import GlrsError

EVAL_VERSION = 1


def effective_seqlen(model, seqlen: int) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or seqlen
    return min(seqlen, int(limit))


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int, max_tokens: int | None = None, device: str = "cpu") -> dict:
    """Returns {'ppl', 'windows', 'tokens', 'seqlen'} for token stream ids [1, N]."""
    seqlen = effective_seqlen(model, seqlen)
    n = ids.shape[1] if max_tokens is None else min(ids.shape[1], max_tokens)
    windows = n // seqlen
    if windows == 0:
        raise GlrsError(f"evaluation text has {n} tokens, fewer than one window of {seqlen}; lower eval.seqlen or use more text")
    total = 0.0
    for w in range(windows):
        x = ids[:, w * seqlen : (w + 1) * seqlen].to(device)
        logits = model(x).logits.float()
        nll = F.cross_entropy(logits[0, :-1], x[0, 1:])
        total += nll.item() * seqlen
    mean_nll = total / (windows * seqlen)
    if not math.isfinite(mean_nll):
        raise GlrsError("perplexity is not finite: the model produced NaN/Inf logits; check the compressed weights")
    return {"ppl": math.exp(mean_nll), "windows": windows, "tokens": windows * seqlen, "seqlen": seqlen}
