"""Per-sample risks for causal language models.

Both functions take logits [B, T, V] and labels [B, T] (the usual Hugging Face convention: labels
are the input ids with question and padding positions set to -100; the causal shift is applied
here) and return a per-sample vector [B] in float32 (float64 for float64 logits). Entry k depends
only on batch row k, which is the contract of ``gefx.grad_dots`` and ``gefx.g_effect``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .precision import acc_dtype

IGNORE_INDEX = -100


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL [B, T-1] after the causal shift (0 at masked positions), and the bool mask of
    answer tokens.

    The labels are shifted instead of the logits: the cross-entropy then runs over the logits'
    own contiguous [B*T, V] rows (slicing ``logits[:, :-1]`` would make the log-softmax copy or
    stride a logits-sized tensor, about 3x slower on the CPU, forward and backward)."""
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits must be [B, T, V] and labels [B, T]; got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    b, t, v = logits.shape
    labels = labels.to(device=logits.device, dtype=torch.long)
    shifted = torch.cat([labels[:, 1:], labels.new_full((b, 1), IGNORE_INDEX)], dim=1)  # no in-place: vmap-safe
    dt = acc_dtype(logits)
    nll = F.cross_entropy(logits.to(dt).reshape(b * t, v), shifted.reshape(-1), reduction="none",
                          ignore_index=IGNORE_INDEX)
    shifted = shifted[:, :-1]
    return nll.view(b, t)[:, :-1], shifted != IGNORE_INDEX


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample NLL: the mean over each sample's own answer tokens (0 for a sample with none).

    The aggregate risk used by ``g_effect`` is the *sum* of this vector; the paper's mean risk
    over a batch of B samples is ``sequence_nll(...) / B`` (G-effects scale by the same 1/B).
    """
    nll, mask = token_nll(logits, labels)
    return nll.sum(1) / mask.sum(1).clamp(min=1)


def token_mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference code's risk as a per-sample vector: sample k's summed token NLL divided by
    the number of answer tokens in the whole batch, so that the vector sums to the batch's
    token-mean NLL (what Hugging Face models return as ``loss``)."""
    nll, mask = token_nll(logits, labels)
    return nll.sum(1) / mask.sum().clamp(min=1)


RISKS = {"token_mean": token_mean_nll, "sequence": sequence_nll}
"""Per-sample risk vectors by name, f(logits, labels) -> [B]: "token_mean" (the paper's and
open-unlearning's NLL, summing to the batch's token-mean NLL) and "sequence" (each sample's mean)."""
