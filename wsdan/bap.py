"""Bilinear Attention Pooling (BAP), Hu et al. 2019, §3.1 and eq. (2)-(3).

Part features P[b, m, c] = (1/HW) Σ_hw A[b,m,h,w] · F[b,c,h,w], flattened m-major to
B×(M·C), followed by a signed square root and L2 normalisation over the whole vector (the
paper omits both; both public codes have them; see docs/algorithm.md §1.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Forward epsilon of the signed square root, as in the public codes.
SQRT_EPS = 1e-12
#: Epsilon used only in the *backward* of the signed square root. The true derivative
#: 1/(2·sqrt(|x| + 1e-12)) reaches 5·10⁵ near zero, and with the ×100 logit scale a fresh
#: attention head then blows up SGD (docs/algorithm.md §1.3). Using 1/(2·sqrt(|x| + 1e-4)) caps
#: the local gradient at 50 and is exact (to 1 %) once |x| > 5e-3, i.e. for every feature
#: that carries signal; the forward value is untouched.
SQRT_GRAD_EPS = 1e-4


class _SignedSqrt(torch.autograd.Function):
    """sign(x)·sqrt(|x| + eps) with a bounded backward (see ``SQRT_GRAD_EPS``)."""

    @staticmethod
    def forward(ctx, x: Tensor, eps: float, grad_eps: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.grad_eps = grad_eps
        return torch.sign(x) * torch.sqrt(x.abs() + eps)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        # d/dx sign(x)·sqrt(|x|+e) = 1 / (2·sqrt(|x|+e)) on both sides of zero.
        return grad * 0.5 * torch.rsqrt(x.abs() + ctx.grad_eps), None, None


def signed_sqrt(x: Tensor, eps: float = SQRT_EPS, grad_eps: float | None = SQRT_GRAD_EPS) -> Tensor:
    """Signed square root. ``grad_eps=None`` gives the exact (unbounded) autograd derivative."""
    if grad_eps is None:
        return torch.sign(x) * torch.sqrt(x.abs() + eps)
    return _SignedSqrt.apply(x, eps, grad_eps)


def bilinear_attention_pool(
    features: Tensor,
    attentions: Tensor,
    *,
    eps: float = SQRT_EPS,
    grad_eps: float | None = SQRT_GRAD_EPS,
) -> Tensor:
    """BAP with signed square root and L2 normalisation.

    Args:
        features: F, B×C×H×W backbone feature maps.
        attentions: A, B×M×H×W non-negative attention maps.
    Returns:
        P, B×(M·C), m-major (row m·C + c holds part m, channel c), unit L2 norm per row.
    """
    b, c, h, w = features.shape
    if attentions.shape[0] != b or attentions.shape[2:] != features.shape[2:]:
        raise ValueError(
            f"attention maps {tuple(attentions.shape)} do not match features {tuple(features.shape)}"
        )
    m = attentions.shape[1]
    # One batched matmul: (B, M, HW) @ (B, HW, C) -> (B, M, C).
    parts = torch.bmm(attentions.flatten(2), features.flatten(2).transpose(1, 2)) / (h * w)
    parts = parts.reshape(b, m * c)  # B×(M·C), m-major
    parts = signed_sqrt(parts, eps=eps, grad_eps=grad_eps)
    return F.normalize(parts, p=2.0, dim=1, eps=eps)
