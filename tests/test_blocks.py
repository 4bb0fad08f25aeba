"""Embedding, attention and residual blocks against their formulas, naive loops and torch's reference ops."""

import math

import pytest
import torch
import torch.nn.functional as F

import tinydiff as td

pytestmark = pytest.mark.unit


def test_sinusoidal_embedding_formula():
    emb = td.SinusoidalEmbedding(8, scale=25.0)
    x = torch.tensor([0.3, -1.2])
    out = emb(x)
    assert out.shape == (2, 8)
    for i, xi in enumerate(x.tolist()):
        for k in range(4):
            w = math.exp(-math.log(10000.0) * k / 3)
            assert out[i, k].item() == pytest.approx(math.sin(25 * xi * w), abs=1e-5)
            assert out[i, 4 + k].item() == pytest.approx(math.cos(25 * xi * w), abs=1e-5)


def naive_attention(q, k, v):
    """One batch element and one head at a time, softmax written out."""
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            s = q[b, h] @ k[b, h].T / math.sqrt(q.shape[-1])
            w = torch.exp(s - s.max(-1, keepdim=True).values)
            out[b, h] = (w / w.sum(-1, keepdim=True)) @ v[b, h]
    return out


@pytest.mark.parametrize("L", [1, 3, 4, 9, 33])
def test_attention_is_scaled_dot_product_attention_and_the_per_head_loop(L):
    g = torch.Generator().manual_seed(L)
    q, k, v = (torch.randn(3, 4, L, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out = td.attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out, naive_attention(q, k, v), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("L", [1, 2, 3, 4, 5, 9, 64])  # the CPU few-token path (L <= 4) and the fused kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_attention_equals_attention(L, dtype):
    g = torch.Generator().manual_seed(L)
    q, k, v = (torch.randn(5, 8, L, 16, generator=g).to(dtype).requires_grad_() for _ in range(3))
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    fast, ref = td.fast_attention(q, k, v), td.attention(q, k, v)
    torch.testing.assert_close(fast, ref, **tol)
    g_out = torch.randn(fast.shape, generator=g).to(dtype)
    torch.testing.assert_close(
        torch.autograd.grad(fast, (q, k, v), g_out), torch.autograd.grad(ref, (q, k, v), g_out), **tol
    )


@pytest.mark.parametrize("L", [3, 9])
@pytest.mark.parametrize("heads", [1, 4, 16])
def test_self_attention_matches_the_layer_written_out(heads, L):
    torch.manual_seed(0)
    attn = td.SelfAttention(128, heads).double()
    x = torch.randn(5, L, 128, dtype=torch.float64, requires_grad=True)
    h = F.layer_norm(x, (128,), attn.norm.weight, attn.norm.bias)
    q, k, v = (h @ attn.qkv.weight.T + attn.qkv.bias).split(128, -1)
    hs = 128 // heads
    outs = []
    for i in range(heads):  # one head at a time
        sl = slice(i * hs, (i + 1) * hs)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hs), -1)
        outs.append(w @ v[..., sl])
    ref = x + torch.cat(outs, -1) @ attn.proj.weight.T + attn.proj.bias
    out = attn(x)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(ref)
    torch.testing.assert_close(
        *(torch.autograd.grad(y, [x, attn.qkv.weight], g) for y in (out, ref)), atol=1e-10, rtol=1e-10
    )


@pytest.mark.parametrize("heads", [3, 5, 0, 7])
def test_heads_that_do_not_divide_the_width_are_refused(heads):
    with pytest.raises(ValueError, match="must divide the token width 128"):
        td.Denoiser(td.DenoiserConfig(attn_layers=1, heads=heads))


def test_heads_error_names_the_divisors_of_the_width():
    with pytest.raises(ValueError) as e:
        td.SelfAttention(30, 4)
    divisors = [h for h in range(1, 31) if 30 % h == 0]
    assert str(e.value) == f"heads 4 must divide the token width 30; use one of {', '.join(map(str, divisors))}"


@pytest.mark.parametrize("block", ["gelu", "relu"])
def test_residual_block_formula(block):
    torch.manual_seed(0)
    res = td.ResidualBlock(16, block)
    x = torch.randn(4, 16)
    W, b = res.ff.weight, res.ff.bias
    gelu = lambda u: 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
    ref = x + (x.clamp(min=0) @ W.T + b if block == "relu" else gelu(x @ W.T + b))
    torch.testing.assert_close(res(x), ref)
