"""QOFT's rotation math against float64 references, the exact Cayley transform, and PEFT's own OFT."""

from __future__ import annotations

import pytest
import torch
from peft import OFTConfig, get_peft_model

from peft_quant import QOFTConfig
from peft_quant.qoft.rotation import cayley_exact, cayley_neumann, num_packed, rotate, skew_symmetric


def _packed(blocks: int, b: int, scale: float, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(blocks, num_packed(b), generator=g, dtype=dtype) * scale


def test_skew_symmetric_layout():
    b = 5
    packed = torch.arange(1, num_packed(b) + 1, dtype=torch.float64)[None]
    q = skew_symmetric(packed, b)[0]
    assert torch.equal(q, -q.T)
    rows, cols = torch.triu_indices(b, b, 1)
    assert torch.equal(q[rows, cols], packed[0])  # row-major upper triangle: the format-version-1 layout
    assert torch.equal(torch.diagonal(q), torch.zeros(b, dtype=q.dtype))


def test_identity_at_zero():
    r = cayley_neumann(torch.zeros(3, num_packed(8), dtype=torch.float64), 8, 5)
    assert torch.equal(r, torch.eye(8, dtype=torch.float64).expand(3, 8, 8))


@pytest.mark.parametrize("terms", [2, 3, 5, 8])
def test_neumann_polynomial_matches_float64_reference(terms):
    """R = I + 2Q + ... + 2Q^(k-2) + Q^(k-1), written out term by term."""
    b = 6
    packed = _packed(2, b, 0.2)
    q = skew_symmetric(packed, b)
    expected = torch.eye(b, dtype=torch.float64).expand_as(q).clone()
    power = torch.eye(b, dtype=torch.float64).expand_as(q)
    for i in range(1, terms):
        power = power @ q
        expected += power * (1.0 if i == terms - 1 else 2.0)
    torch.testing.assert_close(cayley_neumann(packed, b, terms), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("terms", [3, 5, 7])
def test_orthogonal_within_truncation_bound(terms):
    """||R_k - R_exact|| <= (1+q) q^(k-1) / (1-q) with q = ||Q||_2 < 1, and R_exact is orthogonal."""
    b = 16
    packed = _packed(4, b, 0.05, seed=terms)
    q_norm = torch.linalg.matrix_norm(skew_symmetric(packed, b), ord=2)
    assert (q_norm < 1).all()
    exact = cayley_exact(packed, b)
    eye = torch.eye(b, dtype=torch.float64)
    torch.testing.assert_close(exact.transpose(-1, -2) @ exact, eye.expand_as(exact), rtol=0, atol=1e-12)
    approx = cayley_neumann(packed, b, terms)
    bound = (1 + q_norm) * q_norm ** (terms - 1) / (1 - q_norm)
    err = torch.linalg.matrix_norm(approx - exact, ord=2)
    assert (err <= bound * (1 + 1e-9)).all()
    ortho_err = torch.linalg.matrix_norm(approx.transpose(-1, -2) @ approx - eye, ord=2)
    assert (ortho_err <= 2 * bound + bound**2 + 1e-12).all()
    assert (ortho_err > 0).all()  # truncated: not exactly orthogonal, which is why unmerge uses the inverse


def test_rotate_matches_dense_block_diagonal():
    b, blocks = 4, 3
    r = cayley_neumann(_packed(blocks, b, 0.3), b, 5)
    x = torch.randn(2, 7, b * blocks, dtype=torch.float64)
    dense = torch.block_diag(*r)
    torch.testing.assert_close(rotate(x, r), x @ dense, rtol=1e-12, atol=1e-12)
    shared = r[:1]
    torch.testing.assert_close(rotate(x, shared), x @ torch.block_diag(*shared.expand(blocks, b, b)))
    xc = torch.randn(2, b * blocks, 5, 5, dtype=torch.float64)  # channels at dim 1
    expected = torch.einsum("nchw,cd->ndhw", xc, dense)
    torch.testing.assert_close(rotate(xc, r, dim=1), expected, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64():
    b = 4
    packed = _packed(2, b, 0.2).requires_grad_()
    x = torch.randn(3, 2 * b, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, inp: rotate(inp, cayley_neumann(p, b, 5)), (packed, x))


@pytest.mark.parametrize("terms", [4, 5, 6])
def test_equals_peft_oft_on_linear(terms):
    """Same math as PEFT's OFT (peft >= 0.18 Neumann form): same parameters give the same outputs."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(32, 16))
    ref = torch.nn.Sequential(torch.nn.Linear(32, 16))
    ref.load_state_dict(base.state_dict())
    ours = get_peft_model(base, QOFTConfig(target_modules=["0"], block_size=8, num_neumann_terms=terms))
    theirs = get_peft_model(
        ref, OFTConfig(target_modules=["0"], oft_block_size=8, r=0, use_cayley_neumann=True,
                       num_cayley_neumann_terms=terms)
    )
    packed = torch.randn(4, num_packed(8)) * 0.1
    with torch.no_grad():
        ours.base_model.model[0].qoft_Q["default"].copy_(packed)
        theirs.base_model.model[0].oft_R["default"].weight.copy_(packed)
    x = torch.randn(5, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("dim", [-1, 1])
@pytest.mark.parametrize("dropout", [False, True])
def test_rotate_input_equals_autograd_through_the_reference_and_saves_only_x_and_parameters(shared, dim, dropout):
    """The recomputing rotation gives today's values and gradients (autograd through the reference builder and
    rotation) and keeps for backward only the input, the packed parameters and the dropout mask."""
    from peft_quant.kernels.qoft import rotate_input

    torch.manual_seed(0)
    b, width, terms = 4, 16, 5
    packed = (torch.randn(1 if shared else width // b, num_packed(b)) * 0.3).requires_grad_()
    x = torch.randn(3, width, 5, 2) if dim == 1 else torch.randn(3, 5, width)
    x.requires_grad_()
    keep = (torch.arange(width // b) % 2 == 0).view(-1, 1, 1) if dropout else None
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = rotate_input(x, packed, b, terms, keep, dim)
    allowed = {t.untyped_storage().data_ptr() for t in (x, packed, keep) if t is not None}  # keep: one bool a block
    assert {t.untyped_storage().data_ptr() for t in saved} <= allowed
    grad = torch.randn_like(out)
    gx, gp = torch.autograd.grad(out, (x, packed), grad)

    blocks = cayley_neumann(packed, b, terms)
    if keep is not None:
        blocks = torch.where(keep, blocks.expand(keep.shape[0], -1, -1), torch.eye(b))
    expected = rotate(x, blocks, dim)
    ex, ep = torch.autograd.grad(expected, (x, packed), grad)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, ex, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gp, ep, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("blocks,b,terms", [(3, 4, 2), (2, 8, 3), (4, 16, 5), (1, 32, 6)])
def test_analytic_builder_backward_equals_autograd(blocks, b, terms):
    from peft_quant.qoft.rotation import cayley_neumann_backward

    packed = _packed(blocks, b, 0.3).requires_grad_()
    grad = torch.randn(blocks, b, b, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (expected,) = torch.autograd.grad(cayley_neumann(packed, b, terms), packed, grad)
    torch.testing.assert_close(cayley_neumann_backward(skew_symmetric(packed.detach(), b), grad, terms), expected,
                               rtol=1e-12, atol=1e-12)
