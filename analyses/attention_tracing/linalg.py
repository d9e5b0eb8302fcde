"""Torch-only linear algebra of Omega's factored SVD, shared by the local ``omega`` and by
``remote_omega.server_factors``, which runs inside an NDIF session (so: nothing but torch here)."""
from __future__ import annotations

import torch


def center_rows(W: torch.Tensor) -> torch.Tensor:
    """W [H, d, dh] with the mean over d_model removed (TransformerLens' centring of reading weights)."""
    return W - W.mean(-2, keepdim=True)


def augmented_r(R: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """R of the QR of [A; b] from R of A: the upper Cholesky factor of R^T R + b b^T."""
    G = R.transpose(-1, -2) @ R + b[..., :, None] * b[..., None, :]
    return torch.linalg.cholesky(G).transpose(-1, -2)


def qr_pos(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced QR with a non-negative diagonal of R (the unique QR of a full-rank matrix)."""
    Q, R = torch.linalg.qr(A)
    sign = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return Q * sign[..., None, :], R * sign[..., :, None]
