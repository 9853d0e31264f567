"""QOFT's math in plain PyTorch: block rotations from packed skew parameters, and applying them to inputs.

Format version 1 (``QOFTConfig.FORMAT_VERSION``) fixes these definitions; changing any of them changes what a
saved adapter means and must bump that version.

* Parameters: per block, the ``b(b-1)/2`` entries strictly above the diagonal of a skew-symmetric ``Q``
  (row-major order of ``torch.triu_indices(b, b, 1)``), so ``Q = U - Uᵀ``.
* Rotation: the Cayley transform ``R = (I + Q)(I - Q)⁻¹`` with the inverse replaced by a truncated Neumann
  series. With ``k = num_neumann_terms`` terms in ``R``'s polynomial,
  ``R = (I + Q) · Σ_{i=0}^{k-2} Qⁱ = I + 2Q + ... + 2Q^{k-2} + Q^{k-1}`` (equal to peft ≥ 0.18's OFT for k ≥ 4).
* Application: an input row ``x`` split into blocks ``x_j`` becomes ``x_j R_j`` (column form: ``Rᵀx``), so a
  linear layer computes ``W Rᵀ x``; merging writes ``W Rᵀ`` into the weight.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch


def num_packed(block_size: int) -> int:
    """Number of parameters of one ``block_size × block_size`` skew-symmetric block."""
    return block_size * (block_size - 1) // 2


@functools.cache
def _flat_indices(block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (into ``b·b``) of the entries above the diagonal, in the packed order, and of their mirror
    images below it."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=device)
    return rows * block_size + cols, cols * block_size + rows


def skew_symmetric(packed: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(n, b(b-1)/2)`` packed upper triangles → ``(n, b, b)`` skew-symmetric matrices."""
    upper, lower = _flat_indices(block_size, packed.device)
    q = packed.new_zeros(packed.shape[0], block_size * block_size)  # (n, b·b)
    q.index_copy_(1, upper, packed)
    q.index_copy_(1, lower, -packed)
    return q.view(-1, block_size, block_size)


def cayley_neumann(packed: torch.Tensor, block_size: int, num_terms: int) -> torch.Tensor:
    """Rotation blocks ``(n, b, b)`` from packed parameters ``(n, b(b-1)/2)``; identity when ``packed == 0``.

    Summed term by term from the powers of ``Q`` into one accumulator, so backward keeps only ``Q … Q^{k-2}``
    (``k - 2`` blocks of ``b × b``, as PEFT's OFT does), not one partial sum per term as Horner's scheme would.
    """
    return neumann(skew_symmetric(packed, block_size), num_terms)[0]


def neumann(q: torch.Tensor, num_terms: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``R = I + 2Q + … + 2Q^{k-2} + Q^{k-1}`` from skew-symmetric blocks ``q`` ``(n, b, b)``, and the powers
    ``[Q, Q², …, Q^{k-2}]`` it formed (what :func:`cayley_neumann_backward` needs)."""
    if num_terms < 2:
        raise ValueError(f"The Cayley–Neumann series needs num_terms >= 2, got {num_terms}.")
    rotation = q.mul(1.0 if num_terms == 2 else 2.0)
    rotation.diagonal(dim1=-2, dim2=-1).add_(1.0)
    powers = [q]
    for i in range(2, num_terms):
        powers.append(torch.bmm(powers[-1], q))  # Qⁱ
        rotation.add_(powers[-1], alpha=1.0 if i == num_terms - 1 else 2.0)
    return rotation, powers[: num_terms - 2]


def cayley_neumann_backward(q: torch.Tensor, grad: torch.Tensor, num_terms: int,
                            powers: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    """The gradient of :func:`cayley_neumann` for its packed parameters, given the skew-symmetric blocks ``q`` they
    form (:func:`skew_symmetric`) and ``grad = dL/dR`` ``(n, b, b)``, without autograd. ``powers``: ``Q … Q^{k-2}``
    as :func:`neumann` returns them (computed here when not given).

    With ``R = Σ cᵢ Qⁱ`` and ``A = Qᵀ = −Q``: ``dL/dQ = Σ_{i≥1} cᵢ Tᵢ`` where ``T₁ = G`` and
    ``T_{i+1} = A Tᵢ + G Aⁱ = (−1)ⁱ G Qⁱ − Q Tᵢ``; the packed gradient is ``dL/dQ − (dL/dQ)ᵀ`` on the upper triangle
    (``Q = U − Uᵀ``).
    """
    if powers is None:
        powers = neumann(q, num_terms)[1]
    term = grad
    total = grad.mul(1.0 if num_terms == 2 else 2.0)
    for i in range(1, num_terms - 1):
        term = torch.baddbmm(torch.bmm(grad, powers[i - 1]), q, term, beta=(-1.0) ** i, alpha=-1.0)  # T_{i+1}
        total.add_(term, alpha=1.0 if i == num_terms - 2 else 2.0)
    upper, lower = _flat_indices(q.shape[-1], q.device)
    flat = total.reshape(total.shape[0], -1)  # (n, b·b)
    return flat.index_select(1, upper) - flat.index_select(1, lower)


def cayley_exact(packed: torch.Tensor, block_size: int) -> torch.Tensor:
    """The exact Cayley transform ``(I + Q)(I - Q)⁻¹`` (a reference for tests and for truncation bounds)."""
    q = skew_symmetric(packed, block_size)
    eye = torch.eye(block_size, dtype=q.dtype, device=q.device).expand_as(q)
    # X (I - Q) = (I + Q)  ⇔  (I - Q)ᵀ Xᵀ = (I + Q)ᵀ
    return torch.linalg.solve((eye - q).transpose(-1, -2), (eye + q).transpose(-1, -2)).transpose(-1, -2)


def rotate(x: torch.Tensor, blocks: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Apply block-diagonal ``diag(R_1..R_n)`` to ``x`` along ``dim``: each block ``x_j`` becomes ``x_j R_j``.

    ``blocks`` is ``(n, b, b)``; ``n == 1`` shares one block across the whole width.
    """
    moved = x.movedim(dim, -1)
    width = moved.shape[-1]
    b = blocks.shape[-1]
    if blocks.shape[0] == 1:
        out = (moved.reshape(-1, b) @ blocks[0]).reshape(moved.shape)  # (tokens·n, b)
    else:
        xb = moved.reshape(-1, width // b, b).transpose(0, 1)  # (n, tokens, b)
        out = torch.bmm(xb, blocks).transpose(0, 1).reshape(moved.shape)
    if dim in (-1, x.dim() - 1):
        return out
    return out.movedim(-1, dim).contiguous()  # the base layer's kernel then sees the layout it was given
