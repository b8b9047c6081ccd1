"""BAP, signed square root and L2 normalisation against a slow independent loop."""

import math

import torch

from wsdan.bap import SQRT_GRAD_EPS, bilinear_attention_pool, signed_sqrt


def slow_bap(feats: torch.Tensor, attn: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Written from the paper's definition with plain Python loops (float64)."""
    b, c, h, w = feats.shape
    m = attn.shape[1]
    out = torch.zeros(b, m * c, dtype=torch.float64)
    for i in range(b):
        vec = []
        for k in range(m):
            for ch in range(c):
                s = 0.0
                for y in range(h):
                    for x in range(w):
                        s += float(attn[i, k, y, x]) * float(feats[i, ch, y, x])
                s /= h * w
                vec.append(math.copysign(math.sqrt(abs(s) + eps), s) if s != 0 else 0.0)
        norm = math.sqrt(sum(v * v for v in vec))
        out[i] = torch.tensor([v / max(norm, eps) for v in vec], dtype=torch.float64)
    return out


def test_bap_matches_slow_loop():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 5, 3, 4, generator=g)
    attn = torch.rand(2, 3, 3, 4, generator=g)
    fast = bilinear_attention_pool(feats, attn)
    assert fast.shape == (2, 15)
    torch.testing.assert_close(fast.double(), slow_bap(feats, attn), atol=1e-6, rtol=1e-5)
    # m-major layout: part 1, channel 2 sits at index 1·C + 2.
    parts = (attn[0][:, None] * feats[0][None]).mean(dim=(2, 3))  # M×C
    signed = torch.sign(parts) * torch.sqrt(parts.abs())
    expected = signed[1, 2] / signed.norm()
    torch.testing.assert_close(fast[0, 1 * 5 + 2], expected, atol=1e-6, rtol=1e-5)


def test_bap_rows_have_unit_norm_and_zero_attention_gives_zero():
    feats = torch.randn(3, 4, 5, 5)
    attn = torch.rand(3, 2, 5, 5)
    attn[1] = 0.0
    out = bilinear_attention_pool(feats, attn)
    torch.testing.assert_close(out[[0, 2]].norm(dim=1), torch.ones(2))
    assert torch.all(out[1] == 0)


def test_signed_sqrt_forward_exact_and_backward_bounded():
    x = torch.tensor([-4.0, -1e-9, 0.0, 1e-9, 0.25, 9.0], requires_grad=True)
    y = signed_sqrt(x)
    torch.testing.assert_close(y.detach(), torch.sign(x.detach()) * torch.sqrt(x.detach().abs() + 1e-12))
    y.sum().backward()
    bound = 0.5 / math.sqrt(SQRT_GRAD_EPS)
    assert x.grad.max().item() <= bound + 1e-4
    # Far from zero the bounded derivative equals the exact one to 1 %.
    exact = 0.5 / torch.sqrt(torch.tensor([4.0, 0.25, 9.0]))
    torch.testing.assert_close(x.grad[[0, 4, 5]], exact, rtol=1e-2, atol=0)


def test_signed_sqrt_exact_mode_matches_autograd():
    x = torch.tensor([-2.0, 0.5, 3.0], requires_grad=True)
    signed_sqrt(x, grad_eps=None).sum().backward()
    torch.testing.assert_close(x.grad, 0.5 / torch.sqrt(x.detach().abs() + 1e-12))


def test_bap_gradcheck_double():
    feats = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    attn = (torch.rand(2, 2, 2, 2, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda f, a: bilinear_attention_pool(f, a, grad_eps=None), (feats, attn)
    )
