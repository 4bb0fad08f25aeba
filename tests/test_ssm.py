"""Selective scan and the bidirectional Mamba block against the recurrence written as a plain loop."""

import copy

import pytest
import torch
import torch.nn.functional as F

import tinydiff as td

pytestmark = pytest.mark.unit


def scan_reference(dt, A, B_sel, C_sel, x):
    """Plain loop, one element at a time over the sequence: the definition of the recurrence."""
    Bsz, L, D = x.shape
    h = torch.zeros(Bsz, A.shape[0], D, dtype=x.dtype)
    ys = torch.zeros_like(x)
    for t in range(L):
        for n in range(A.shape[0]):
            h[:, n] = torch.exp(dt[:, t] * A[n]) * h[:, n] + dt[:, t] * B_sel[:, t, n, None] * x[:, t]
        ys[:, t] = (C_sel[:, t, :, None] * h).sum(1)
    return ys


def scan_inputs(L, dtype, Bsz=2, D=6, N=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = F.softplus(torch.randn(Bsz, L, D, generator=g) - 2).to(dtype)
    A = -torch.arange(1, N + 1, dtype=dtype)[:, None].repeat(1, D)
    B, C = torch.randn(Bsz, L, N, generator=g).to(dtype), torch.randn(Bsz, L, N, generator=g).to(dtype)
    return dt, A, B, C, torch.randn(Bsz, L, D, generator=g).to(dtype)


@pytest.mark.parametrize("L", [1, 2, 3, 17, 256])
@pytest.mark.parametrize("parallel", [False, True])
def test_scan_paths_match_the_plain_loop(L, parallel):
    ref = scan_reference(*scan_inputs(L, torch.float64))
    out64 = td.selective_scan(*scan_inputs(L, torch.float64), parallel=parallel)
    assert (out64 - ref).abs().max().item() < 1e-10
    out32 = td.selective_scan(*scan_inputs(L, torch.float32), parallel=parallel)
    assert (out32.double() - ref).abs().max().item() < 1e-5


def test_parallel_scan_of_a_generic_recurrence():
    g = torch.Generator().manual_seed(0)
    for L in (1, 5, 64, 1000):
        a, b = (
            torch.rand(3, L, 4, generator=g, dtype=torch.float64),
            torch.randn(3, L, 4, generator=g, dtype=torch.float64),
        )
        h, ref = torch.zeros(3, 4, dtype=torch.float64), []
        for t in range(L):
            h = a[:, t] * h + b[:, t]
            ref.append(h)
        assert (td.scan_parallel(a, b) - torch.stack(ref, 1)).abs().max().item() < 1e-10


@pytest.mark.parametrize("parallel", [False, True])
def test_scan_gradcheck(parallel):
    inputs = [t.requires_grad_() for t in scan_inputs(5, torch.float64, Bsz=1, D=2, N=2)]
    assert torch.autograd.gradcheck(lambda *a: td.selective_scan(*a, parallel=parallel), inputs)


def test_selective_ssm_is_conv_silu_scan_plus_skip():
    """Reference: the causal depthwise conv by F.conv1d (left padding), then the plain-loop scan."""
    torch.manual_seed(0)
    ssm = td.SelectiveSSM(8, 4, 2).double()
    with torch.no_grad():
        ssm.skip.uniform_(0.5, 1.5)
    x = torch.randn(3, 10, 8, dtype=torch.float64)
    K = ssm.conv_weight.shape[0]
    conv = F.conv1d(F.pad(x.transpose(1, 2), (K - 1, 0)), ssm.conv_weight.T[:, None], ssm.conv_bias, groups=8)
    u = F.silu(conv.transpose(1, 2))
    dt, B_sel, C_sel = (u @ ssm.x_proj.weight.T).split([2, 4, 4], -1)
    dt = F.softplus(dt @ ssm.dt_proj.weight.T + ssm.dt_proj.bias)
    ref = scan_reference(dt, -torch.exp(ssm.A_log), B_sel, C_sel, u) + ssm.skip * u
    torch.testing.assert_close(ssm(x), ref, atol=1e-10, rtol=1e-10)


def test_long_sequences_stay_finite_at_mamba_init():
    torch.manual_seed(0)
    block = td.BiMambaBlock(16, d_state=16)
    assert torch.isfinite(block(torch.randn(2, 2048, 16))).all()
    ssm, u = block.forward_ssm, torch.randn(1, 1024, 32)
    seq = ssm(u)
    td_scan = td.selective_scan
    try:  # the parallel path agrees at L = 1024
        td.selective_scan = lambda *a: td_scan(*a, parallel=True)
        torch.testing.assert_close(ssm(u), seq, atol=1e-4, rtol=1e-4)
    finally:
        td.selective_scan = td_scan


def test_forward_branch_is_causal():
    torch.manual_seed(0)
    ssm = td.SelectiveSSM(8, 4, 1)
    x = torch.randn(2, 12, 8)
    j = 7
    x2 = x.clone()
    x2[:, j] += 1.0
    y, y2 = ssm(x), ssm(x2)
    assert torch.equal(y[:, :j], y2[:, :j])
    assert not torch.equal(y[:, j], y2[:, j])


def test_bidirectional_block_is_the_average_of_both_directions():
    torch.manual_seed(0)
    blk = td.BiMambaBlock(16, d_state=4)
    x = torch.randn(3, 9, 16)
    u, z = blk.in_proj(blk.norm(x)).chunk(2, -1)
    both = 0.5 * (blk.forward_ssm(u) + blk.backward_ssm(u.flip(1)).flip(1))
    torch.testing.assert_close(blk(x), x + blk.out_proj(both * F.silu(z)))
    # swapping the two directions' weights and reversing the input reverses the output
    swapped = copy.deepcopy(blk)
    swapped.forward_ssm, swapped.backward_ssm = swapped.backward_ssm, swapped.forward_ssm
    torch.testing.assert_close(swapped(x.flip(1)), blk(x).flip(1), atol=1e-6, rtol=1e-5)


def test_dt_bias_is_inverse_softplus_of_dt_range_and_A_is_s4d_real():
    torch.manual_seed(0)
    ssm = td.SelectiveSSM(512, 4, 4)
    dt = F.softplus(ssm.dt_proj.bias)
    assert dt.min().item() >= 1e-3 * 0.999 and dt.max().item() <= 1e-1 * 1.001
    torch.testing.assert_close(torch.exp(ssm.A_log), torch.arange(1.0, 5.0)[:, None].expand(4, 512))
    assert torch.equal(ssm.skip, torch.ones(512))
