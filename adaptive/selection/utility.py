"""UDS utility: the nuclear norm of each sample's logits matrix (Zou et al., arXiv 2510.16882).

For sample ``i`` with logits ``L_i`` (tokens × vocab),

    u_i = ‖M_i L_i‖_* = Σ_j σ_j(M_i L_i),

where ``M_i`` zeroes the rows of padding positions. Zero rows add no singular value, so this is
exactly the nuclear norm of the unpadded ``n_i × V`` matrix. ``‖L‖_F ≤ ‖L‖_* ≤ √min(n, V)‖L‖_F``:
large for confident, varied predictions and small when the model keeps predicting one token
(rank 1). The reference code counts left-padding positions; here they are masked.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _as_matrices(logits: Tensor, attention_mask: Tensor | None) -> Tensor:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() == 2:
        if attention_mask is not None:
            raise ValueError(
                "attention_mask applies to (batch, tokens, vocab) logits; got (batch, classes) "
                f"logits of shape {tuple(logits.shape)} with a mask"
            )
        return logits.unsqueeze(1)
    if logits.dim() != 3:
        raise ValueError(
            "logits must have shape (batch, classes) or (batch, tokens, vocab), got shape "
            f"{tuple(logits.shape)}"
        )
    if attention_mask is None:
        return logits
    if not isinstance(attention_mask, Tensor):
        raise TypeError(
            f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}"
        )
    if tuple(attention_mask.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"attention_mask must have shape (batch, tokens) = {tuple(logits.shape[:2])}, got "
            f"{tuple(attention_mask.shape)}"
        )
    return logits * attention_mask.to(logits.dtype).unsqueeze(-1)


def masked_logits(logits: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """``(b, T, V)`` float32 logits with padding rows zeroed; ``(b, C)`` becomes ``(b, 1, C)``."""
    matrices = _as_matrices(logits, attention_mask)
    return matrices.float() if matrices.dtype in (torch.float16, torch.bfloat16) else matrices


@torch.no_grad()
def nuclear_norms(matrices: Tensor) -> Tensor:
    """``Σ_j σ_j(M_i)`` for each matrix of a ``(b, n, m)`` batch, from the smaller Gram matrix.

    ``σ_j(M)²`` are the eigenvalues of ``M Mᵀ`` (``n × n``; ``Mᵀ M`` when ``m < n``), so the
    nuclear norm is ``Σ_j √λ_j``. For LM logits (``n`` tokens ≪ ``m`` = vocabulary) this replaces
    an SVD of ``n × V`` by one batched matmul and an ``n × n`` eigendecomposition (about 20× faster
    on CPU for 35 × 49,152). The Gram matrix is formed in the matrices' precision, the
    eigenvalues in float64; rounding can make the smallest ones slightly negative, so they are
    clamped at 0.
    """
    m = matrices if matrices.shape[-2] <= matrices.shape[-1] else matrices.transpose(-2, -1)
    gram = (m @ m.transpose(-2, -1)).double()
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().sum(dim=-1).to(matrices.dtype)


def uds_utility(logits: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Nuclear norm of each sample's logits, padding masked: ``u_i = Σ_j σ_j(M_i L_i)``.

    Args:
        logits: ``(b, tokens, vocab)`` raw logits of a language model, or ``(b, classes)``
            logits of a classifier (each sample is then a ``1 × C`` matrix and ``u_i = ‖l_i‖₂``).
        attention_mask: ``(b, tokens)`` with 1 for real tokens and 0 for padding (any padding
            side); only for 3-D logits.

    Returns:
        ``(b,)`` utilities (float32 for half-precision inputs), on the logits' device.

    Example::

        u = uds_utility(model(ids, attention_mask=mask).logits, mask)

    Reference: Zou et al., "UDS", arXiv 2510.16882 (utility term).
    """
    return nuclear_norms(masked_logits(logits, attention_mask))
