"""tinydiff: denoising diffusion on D-dimensional points, in one file needing only torch and the standard library; in
the order of the math:
1. NoiseScheduler    DDPM (Ho et al. 2020, arXiv:2006.11239), DDIM (Song et al. 2021, arXiv:2010.02502), cosine
(arXiv:2102.09672)
2-4. SinusoidalEmbedding (Vaswani et al. 2017); SelfAttention over the tokens [x1, ..., xD, t, c]; ResidualBlock
(tiny-diffusion's)
5. BiMambaBlock      bidirectional selective SSM (Mamba arXiv:2312.00752, Vision Mamba arXiv:2401.09417, DiS
arXiv:2402.05608)
6. Denoiser          eps_theta(x_t, t, c): coordinate, time and condition tokens -> attention / SSM mixers -> residual
MLP
7-8. ddpm_loss (Ho et al. eq. 14); samplers: DDPM, DDIM, DPM-Solver++(2M) (Lu et al. 2022); classifier-free guidance
(arXiv:2207.12598)
9. fast_attention    section 3's attention, faster on small CPU batches
"""

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def as_tensor(value, name):
    """A tensor, numpy array, (nested) list or Python number as a tensor, its kind kept (integers stay integers);
    anything else is refused in one sentence naming the argument."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (bool, int, float, list, tuple)) or type(value).__module__.split(".")[0] == "numpy":
        try:
            return torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{name} could not be read as numbers ({e}); give a tensor, numpy array or list") from None
    raise ValueError(f"{name} must be a tensor, numpy array, list or number, not {type(value).__name__}")


def whole(n):
    """n is an integer (Python's or numpy's), not a bool."""
    return isinstance(n, numbers.Integral) and not isinstance(n, bool)


def require(*rules):
    """A user's mistake, named in one sentence: ValueError with the message of the first (bad, message) rule whose
    bad holds."""
    for bad, message in rules:
        if bad:
            raise ValueError(message)


# -----------------------------------------------------------------------------
# 1. Noise scheduler

BETA_SCHEDULES = ("linear", "quadratic", "cosine", "logsnr")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class NoiseScheduler(nn.Module):
    """Forward process q(x_t | x_0) and the reverse steps (diffusers' names); schedules in float64, kept as unsaved
    float32 buffers. x_t = alpha_t x_0 + sigma_t eps, alpha_t = sqrt(ab_t), sigma_t = sqrt(1 - ab_t).

    prediction_type: what the network outputs, and so what the loss regresses (get_target) and every sampler converts
    back (predict): "epsilon" the noise (Ho et al.), "v_prediction" v = alpha eps - sigma x_0 (Salimans & Ho 2022,
    arXiv:2202.00512), "sample" x_0 itself. Only v and x_0 stay finite where alpha_T ~ 0, as the cosine schedule ends.
    The study's linear schedule at T = 100 ends at alpha_bar_T ~ 0.36: x_T keeps 60% of the signal."""

    def __init__(
        self, num_train_timesteps=100, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon"
    ):
        super().__init__()
        T = self.num_train_timesteps = num_train_timesteps
        require(
            (not whole(T) or T < 1, f"num_train_timesteps {T!r} must be a whole number, at least 1"),
            (not 0 < beta_start < 1 or not 0 < beta_end < 1, f"betas must lie in (0, 1): {beta_start}, {beta_end}"),
        )
        require(
            (
                beta_schedule not in BETA_SCHEDULES,
                f"unknown beta_schedule {beta_schedule!r}; use {', '.join(BETA_SCHEDULES)}",
            ),
            (
                prediction_type not in PREDICTION_TYPES,
                f"unknown prediction_type {prediction_type!r}; use {', '.join(PREDICTION_TYPES)}",
            ),
        )
        self.prediction_type = prediction_type
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        elif beta_schedule == "quadratic":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        elif beta_schedule == "cosine":  # Nichol & Dhariwal eq. 17, s = 0.008, betas capped at 0.999
            f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        else:  # logsnr: log(alpha / sigma) falls evenly from the linear schedule's first step to its negative
            lam_0 = 0.5 * math.log((1 - beta_start) / beta_start)
            ab = torch.sigmoid(2 * torch.linspace(lam_0, -lam_0, T, dtype=torch.float64))  # ab = SNR / (1 + SNR)
            betas = 1 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        alphas = 1 - betas
        ab = torch.cumprod(alphas, 0)  # alpha_bar_t
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        # posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t) (eqs. 6-7); log_snr lambda_t =
        # log(alpha_t / sigma_t)
        buffers = dict(
            betas=betas,
            alphas_cumprod=ab,
            sqrt_alphas_cumprod=ab.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1 - ab).sqrt(),
            posterior_variance=betas * (1 - ab_prev) / (1 - ab),
            posterior_mean_coef1=betas * ab_prev.sqrt() / (1 - ab),
            posterior_mean_coef2=(1 - ab_prev) * alphas.sqrt() / (1 - ab),
            log_snr=0.5 * torch.log(ab / (1 - ab)),
        )
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)
        self.alpha_bar_T = self.alphas_cumprod[-1].item()

    def prior(self, n, mean=None, cov=None, generator=None, device="cpu", dim=None, groups=None):
        """n points x_T ~ N(sqrt(ab_T) mean, ab_T cov + (1 - ab_T) I): q(x_T)'s moments for data of that mean and cov;
        else N(0, I_dim).
        With groups (n,), row i takes mean[groups[i]] from (K, D) means, and cov[groups[i]] from (K, D, D)
        covariances."""
        require(
            (
                mean is None and dim is None,
                "prior needs the data's mean and cov, or dim (coordinates per point) for the N(0, I) start",
            )
        )
        z = torch.randn((n, dim if mean is None else mean.shape[-1]), generator=generator, device=device)
        if mean is None:
            return z
        ab, mean, cov = (
            v.detach().cpu().double() for v in (self.alphas_cumprod[-1], mean, cov)
        )  # on the CPU: MPS has no float64
        L = (
            torch.linalg.cholesky(ab * cov + (1 - ab) * torch.eye(mean.shape[-1], dtype=torch.float64))
            .float()
            .to(device)
        )
        mean = (ab.sqrt() * mean).float().to(device)
        if groups is None:
            return mean + z @ L.T
        groups = groups.to(device)
        x = mean[groups] + (z @ L.T if L.ndim == 2 else 0)
        for k in groups.unique() if L.ndim == 3 else ():  # one Cholesky factor per group, never one per row
            x[groups == k] += z[groups == k] @ L[k].T
        return x

    def add_noise(self, x0, noise, t):
        """Sample q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I)   (eq. 4). t: (B,) long."""
        return self.sqrt_alphas_cumprod[t, None] * x0 + self.sqrt_one_minus_alphas_cumprod[t, None] * noise

    def get_target(self, x0, noise, t):
        """What the network learns to output for x_t = add_noise(x0, noise, t), by prediction_type. t: (B,) long."""
        if self.prediction_type == "v_prediction":  # v = alpha_t eps - sigma_t x_0
            return self.sqrt_alphas_cumprod[t, None] * noise - self.sqrt_one_minus_alphas_cumprod[t, None] * x0
        return x0 if self.prediction_type == "sample" else noise

    def convert(self, model_output, x_t, alpha, sigma):
        """(x_0, eps) that the network's output stands for at x_t = alpha x_0 + sigma eps (alpha^2 + sigma^2 = 1);
        no clipping to [-1, 1]: the data span +-4."""
        if self.prediction_type == "epsilon":  # DDPM eq. 15, DDIM eq. 12
            return (x_t - sigma * model_output) / alpha, model_output
        if self.prediction_type == "v_prediction":  # Salimans & Ho eq. 23 and its eps
            return alpha * x_t - sigma * model_output, sigma * x_t + alpha * model_output
        return model_output, (x_t - alpha * model_output) / sigma

    def predict(self, model_output, t, x_t):
        """(x_0, eps) from the network's output at the integer timestep t."""
        return self.convert(model_output, x_t, self.sqrt_alphas_cumprod[t], self.sqrt_one_minus_alphas_cumprod[t])

    def predict_x0(self, model_output, t, x_t):
        return self.predict(model_output, t, x_t)[0]

    def step(self, model_output, t, x_t, generator=None):
        """One DDPM ancestral step x_t -> x_{t-1} with the fixed_small variance beta_tilde_t."""
        x0 = self.predict_x0(model_output, t, x_t)  # eq. 15
        mean = self.posterior_mean_coef1[t] * x0 + self.posterior_mean_coef2[t] * x_t  # eq. 7
        if t == 0:  # beta_tilde_0 = 0
            return mean
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return mean + self.posterior_variance[t].sqrt() * noise

    def set_timesteps(self, num_inference_steps, spacing="linear"):
        """Distinct timesteps from T-1 down to 0, even in t ("linear") or in log-SNR ("logsnr": more steps at low noise,
        where detail forms)."""
        T, n = self.num_train_timesteps, num_inference_steps
        require((not 1 <= n <= T, f"steps must be in 1..{T}, got {n}"))
        if spacing == "linear":
            return torch.linspace(T - 1, 0, n).round().long().tolist()
        require((spacing != "logsnr", f"unknown spacing {spacing!r}; use linear or logsnr"))
        lam = self.log_snr.double()
        targets = torch.linspace(lam[-1].item(), lam[0].item(), n, dtype=torch.float64)
        ts = [
            max(t, n - 1 - i) for i, t in enumerate((lam[None, :] - targets[:, None]).abs().argmin(1).tolist())
        ]  # nearest, with room below
        for i in range(1, n):  # distinct: step down by at least 1
            ts[i] = min(ts[i], ts[i - 1] - 1)
        return ts

    def ddim_step(self, model_output, t, t_prev, x_t, eta=0.0, generator=None):
        """One DDIM step x_t -> x_{t_prev} (eq. 12; t_prev = -1: the clean sample). eta = 1: DDPM's variance (eq. 16);
        0: deterministic."""
        ab_t = self.alphas_cumprod[t]
        ab_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(ab_t)
        x0, eps = self.predict(model_output, t, x_t)
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()
        # the x_0 part + the direction pointing to x_t
        prev = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and t_prev >= 0:
            prev = prev + sigma * torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return prev

    def dpm_solver_step(self, x0, t, s, x_t, x0_last=None, t_last=None, generator=None):
        """One DPM-Solver++(2M) SDE step x_t -> x_s, s < t (Lu et al. 2022, data prediction). With h = lambda_s -
        lambda_t, the linear part is exact: x_s = sigma_s/sigma_t e^-h x_t + alpha_s (1 - e^-2h) x0_hat + sigma_s sqrt(1
        - e^-2h) z, where x0_hat is x0 extrapolated linearly in lambda through x0_last (at t_last); without it, the DDPM
        posterior step t -> s."""
        lam, sigma = self.log_snr, self.sqrt_one_minus_alphas_cumprod
        h = lam[s] - lam[t]
        x0_hat = x0 if x0_last is None else x0 + (x0 - x0_last) * h / (2 * (lam[t] - lam[t_last]))
        z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return (
            sigma[s] / sigma[t] * torch.exp(-h) * x_t
            - self.sqrt_alphas_cumprod[s] * torch.expm1(-2 * h) * x0_hat
            + sigma[s] * (-torch.expm1(-2 * h)).sqrt() * z
        )


# -----------------------------------------------------------------------------
# 2. Sinusoidal embedding


class SinusoidalEmbedding(nn.Module):
    """(B,) -> (B, dim): [sin(s x w_i), cos(s x w_i)], w_i = exp(-ln(10000) i / (half - 1))."""

    def __init__(self, dim, scale=1.0):
        super().__init__()
        half, self.scale = dim // 2, scale
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / (half - 1)), persistent=False)

    def forward(self, x):
        arg = (x.float() * self.scale)[:, None] * self.freqs  # (B, half)
        return torch.cat([arg.sin(), arg.cos()], dim=-1)


# -----------------------------------------------------------------------------
# 3-4. Attention and residual MLP blocks


def attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v over the tokens. q, k, v: (B, nh, L, hs) -> (B, nh, L, hs)."""
    return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1) @ v  # weights (B, nh, L, L)


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention with a residual: x + proj(attention(LN(x)))."""

    def __init__(self, dim, heads):
        super().__init__()
        divisors = ", ".join(str(h) for h in range(1, dim + 1) if dim % h == 0)
        require((heads < 1 or dim % heads, f"heads {heads} must divide the token width {dim}; use one of {divisors}"))
        self.heads, self.norm, self.qkv, self.proj = (
            heads,
            nn.LayerNorm(dim),
            nn.Linear(dim, 3 * dim),
            nn.Linear(dim, dim),
        )

    def forward(self, x):
        B, L, E = x.shape
        q, k, v = (
            self.qkv(self.norm(x)).view(B, L, 3, self.heads, E // self.heads).transpose(1, 3).unbind(2)
        )  # each (B, nh, L, hs)
        return x + self.proj(
            fast_attention(q, k, v).transpose(1, 2).reshape(B, L, E)
        )  # fast_attention = attention, section 9


class ResidualBlock(nn.Module):
    """x + GELU(Linear(x)) (block="gelu", tiny-diffusion's) or x + Linear(ReLU(x)) (block="relu", the study's)."""

    def __init__(self, dim, block="gelu"):
        super().__init__()
        self.ff, self.block = nn.Linear(dim, dim), block

    def forward(self, x):
        return x + self.ff(F.relu(x)) if self.block == "relu" else x + F.gelu(self.ff(x))


# -----------------------------------------------------------------------------
# 5. Bidirectional selective state space block
# h_t = a_t h_{t-1} + b_t by products and sums only (cumsum(log a) overflows: NaN for L >= 64); Mamba's B, C are B_sel,
# C_sel here


def scan_parallel(a, b):
    """h_t = a_t h_{t-1} + b_t along dim 1 (h_{-1} = 0) by odd/even reduction in 2 log2(L) batched steps (GPUs, long
    L)."""
    L = a.shape[1]
    if L == 1:
        return b
    if L % 2:  # pad with the identity element (a=1, b=0)
        a, b = torch.cat([a, torch.ones_like(a[:, :1])], 1), torch.cat([b, torch.zeros_like(b[:, :1])], 1)
    a_even, a_odd, b_even, b_odd = a[:, 0::2], a[:, 1::2], b[:, 0::2], b[:, 1::2]
    h_odd = scan_parallel(a_odd * a_even, a_odd * b_even + b_odd)  # steps 2i, 2i+1 composed: a scan over h_1, h_3, ...
    h_even = torch.cat(
        [b_even[:, :1], a_even[:, 1:] * h_odd[:, :-1] + b_even[:, 1:]], 1
    )  # h_{2i} = a_{2i} h_{2i-1} + b_{2i}, h_0 = b_0
    return torch.stack([h_even, h_odd], 2).flatten(1, 2)[:, :L]  # interleave -> (B, L, ...)


def selective_scan(dt, A, B_sel, C_sel, x, parallel=None):
    """Mamba's h_t = exp(dt_t A) h_{t-1} + dt_t B_sel_t x_t, y_t = C_sel_t h_t. dt, x: (B, L, d_inner); A: (N, d_inner);
    B_sel, C_sel:
    (B, L, N); h: (B, N, d_inner), channels last. parallel=None: the parallel scan on GPU for L > 16, else the loop
    (docs/performance.md)."""
    parallel = x.is_cuda and x.shape[1] > 16 if parallel is None else parallel
    a = lambda dt_: torch.exp(dt_.unsqueeze(-2) * A)  # zero-order hold of A, in (0, 1]
    b = lambda dt_, B_, x_: (dt_ * x_).unsqueeze(-2) * B_.unsqueeze(-1)  # Euler step for B, as in Mamba
    if parallel:
        h = scan_parallel(a(dt), b(dt, B_sel, x))  # (B, L, N, d_inner)
        return (h * C_sel.unsqueeze(-1)).sum(-2)
    h, ys = torch.zeros_like(x[:, 0]).unsqueeze(-2), []
    for dt_t, B_t, C_t, x_t in zip(dt.unbind(1), B_sel.unbind(1), C_sel.unbind(1), x.unbind(1)):
        h = a(dt_t) * h + b(dt_t, B_t, x_t)  # (B, N, d_inner)
        ys.append((h * C_t.unsqueeze(-1)).sum(-2))
    return torch.stack(ys, 1)


class SelectiveSSM(nn.Module):
    """One direction of Mamba's mixer after in_proj: causal depthwise conv -> SiLU -> selective scan."""

    def __init__(self, d_inner, d_state, dt_rank, d_conv=4, dt_min=1e-3, dt_max=1e-1):
        super().__init__()
        self.dt_rank, self.d_state = dt_rank, d_state
        # the depthwise causal Conv1d as K shifted multiply-adds: nn.Conv1d's backward is slow on CPU at this size
        self.conv_weight = nn.Parameter(torch.empty(d_conv, d_inner).uniform_(-(d_conv**-0.5), d_conv**-0.5))
        self.conv_bias = nn.Parameter(torch.empty(d_inner).uniform_(-(d_conv**-0.5), d_conv**-0.5))
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner)
        nn.init.uniform_(self.dt_proj.weight, -(dt_rank**-0.5), dt_rank**-0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))  # log-uniform
        with torch.no_grad():  # the bias is dt's inverse softplus, so softplus(bias) = dt
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real init A = -(1..N) for every channel, stored as (N, d_inner) to match the state layout
        self.A_log = nn.Parameter(
            torch.log(torch.arange(1, d_state + 1, dtype=torch.float32))[:, None].repeat(1, d_inner)
        )
        self.skip = nn.Parameter(torch.ones(d_inner))  # Mamba's D: y + D * x

    def forward(self, x):  # (B, L, d_inner)
        L, K = x.shape[1], self.conv_weight.shape[0]
        xp = F.pad(x, (0, 0, K - 1, 0))  # (B, K-1+L, d_inner): left padding makes the conv causal
        x = F.silu(self.conv_bias + sum(self.conv_weight[k] * xp[:, k : k + L] for k in range(K)))
        dt, B_sel, C_sel = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return (
            selective_scan(
                F.softplus(self.dt_proj(dt)), -torch.exp(self.A_log), B_sel.contiguous(), C_sel.contiguous(), x
            )
            + self.skip * x
        )


class BiMambaBlock(nn.Module):
    """Pre-norm residual bidirectional Mamba block (Vision Mamba v2 / DiS): in_proj and out_proj are shared, each
    direction has its own SelectiveSSM. The directions are averaged (the output scale does not depend on their number),
    gated with SiLU(z)."""

    def __init__(self, dim, d_state=8, expand=2, d_conv=4):
        super().__init__()
        d_inner, dt_rank = expand * dim, math.ceil(dim / 16)
        self.norm, self.in_proj = nn.LayerNorm(dim), nn.Linear(dim, 2 * d_inner, bias=False)
        self.forward_ssm, self.backward_ssm = (SelectiveSSM(d_inner, d_state, dt_rank, d_conv) for _ in range(2))
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def forward(self, x):  # (B, L, dim)
        u, z = self.in_proj(self.norm(x)).chunk(2, dim=-1)  # each (B, L, d_inner)
        return x + self.out_proj(
            0.5 * (self.forward_ssm(u) + self.backward_ssm(u.flip(1)).flip(1)) * F.silu(z)
        )  # mean of the directions, gated


# -----------------------------------------------------------------------------
# 6. Denoiser

MODEL_SD = (
    2.0  # set_data_stats(standardize=True): each coordinate's sd in the model's space (the named datasets' ~1.2-2.3)
)


class AffineMap(nn.Module):
    """x = shift + scale * z per coordinate, between data units x and a model's space z. The shift is a float32 pair
    (shift + shift_lo) adding up to its float64 value: data at an offset of 1e9 times their spread map exactly, even on
    MPS (no float64)."""

    def __init__(self, dim):
        super().__init__()
        for name, value in (("shift", torch.zeros(dim)), ("shift_lo", torch.zeros(dim)), ("scale", torch.ones(dim))):
            self.register_buffer(name, value)

    def set(self, shift, scale):
        shift = torch.as_tensor(shift, dtype=torch.float64)
        self.shift.copy_(shift), self.scale.copy_(torch.as_tensor(scale, dtype=torch.float64))  # rounded to float32
        self.shift_lo.copy_(shift - self.shift.double())

    def to_model(
        self, x
    ):  # z = (x - shift) / scale, computed in x's dtype (float64: exact; integers: float64), returned as float32
        x = x if x.is_floating_point() else x.to(torch.float32 if x.device.type == "mps" else torch.float64)
        return ((x - self.shift.to(x.dtype) - self.shift_lo.to(x.dtype)) / self.scale.to(x.dtype)).float()

    def to_data(self, z):  # x = shift + scale * z, in float64 (float32 on MPS, which has no float64)
        dtype = torch.float32 if z.device.type == "mps" else torch.float64
        return self.shift.to(dtype) + self.shift_lo.to(dtype) + self.scale.to(dtype) * z.to(dtype)


@dataclass
class DenoiserConfig:
    data_dim: int = 2  # D, coordinates per point: one token each, plus the time token
    emb_dim: int = 128  # E, width of each sinusoidal embedding (= token width)
    hidden: int = 256  # width of the residual MLP
    hidden_layers: int = 3  # residual blocks
    block: str = "gelu"  # "gelu": Linear-GELU-blocks-Linear; "relu": the study's Linear-blocks-ReLU-Linear
    attn_layers: int = 0  # self-attention layers over the tokens [x1, ..., xD, t, (c)]
    heads: int = 4
    ssm_layers: int = 0  # bidirectional SSM blocks over the same tokens, with long skips
    ssm_dim: int = 64  # token width inside the SSM stack (d_inner = 2 * ssm_dim)
    d_state: int = 4  # SSM state size per channel
    coord_scale: float = 50.0  # sinusoidal scale for the coordinates (the study's: 25)
    time_scale: float = 1.0  # sinusoidal scale for the integer timestep
    num_classes: int = 0  # K > 0: labels 0..K-1 become a condition token; label K is the null ("no condition")
    cond_dim: int = 0  # C > 0: a vector of C numbers becomes the condition token


class Denoiser(nn.Module):
    """eps_theta(z_t, t, y): (B, D), (B,), condition -> (B, D) in the model's space z (set_data_stats). Each coordinate,
    t and the condition become tokens of width E, mixed by optional attention and SSM blocks (DiS, with U-ViT's long
    skips), then flattened into the residual MLP (D = 2, no mixers: the study's MLPDenoiser for block="relu"). y: (B,)
    labels or (B, C) numbers (standardized, then
    Linear-SiLU-Linear as DiT embeds t). Rows where drop is True, or all if y is None, get the learned null
    condition."""

    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        D, E, K, C = cfg.data_dim, cfg.emb_dim, cfg.num_classes, cfg.cond_dim
        self.cfg, self.conditional = cfg, K > 0 or C > 0
        require(
            (D < 1, f"data_dim {D} must be at least 1: it is the number of coordinates per point"),
            (
                K < 0 or C < 0 or (K and C),
                f"use num_classes=K > 0 (labels) or cond_dim=C > 0 (numbers), not both: got {K}, {C}",
            ),
            (cfg.block not in ("gelu", "relu"), f"unknown block {cfg.block!r}; use gelu or relu"),
        )
        self.coord_emb, self.time_emb = SinusoidalEmbedding(E, cfg.coord_scale), SinusoidalEmbedding(E, cfg.time_scale)
        self.attn = nn.ModuleList(SelfAttention(E, cfg.heads) for _ in range(cfg.attn_layers))
        if cfg.ssm_layers:  # the SSM stack runs at width ssm_dim, as a residual branch on the tokens
            self.ssm_in, self.ssm_out = nn.Linear(E, cfg.ssm_dim), nn.Linear(cfg.ssm_dim, E)
        self.ssm = nn.ModuleList(BiMambaBlock(cfg.ssm_dim, cfg.d_state) for _ in range(cfg.ssm_layers))
        self.skips = nn.ModuleList(nn.Linear(2 * cfg.ssm_dim, cfg.ssm_dim) for _ in range(cfg.ssm_layers // 2))
        blocks = [ResidualBlock(cfg.hidden, cfg.block) for _ in range(cfg.hidden_layers)]
        inputs = (D + 1 + self.conditional) * E  # the flattened tokens
        first, last = (
            ([], [nn.ReLU()]) if cfg.block == "relu" else ([nn.GELU()], [])
        )  # relu: the study's MLPDenoiser, ReLU before the output
        self.mlp = nn.Sequential(nn.Linear(inputs, cfg.hidden), *first, *blocks, *last, nn.Linear(cfg.hidden, D))
        if (
            K
        ):  # created last, so that an unconditional model draws the same initial weights; row K of class_*: the data's
            self.label_emb = nn.Embedding(K + 1, E)
            self.register_buffer("class_mean", torch.zeros(K + 1, D))
            self.register_buffer("class_cov", torch.eye(D).repeat(K + 1, 1, 1))
        if C:
            self.cond_emb = nn.Sequential(nn.Linear(C, E), nn.SiLU(), nn.Linear(E, E))
            self.null_cond = nn.Parameter(0.02 * torch.randn(E))
            self.cond_map = AffineMap(C)
            self.register_buffer("cond_coef", torch.zeros(C, D))  # z's mean = data_mean + c cond_coef, c standardised
            self.register_buffer("cond_cov", torch.eye(D))  # the residuals' covariance
        # what set_data_stats learns about the training data, saved with the weights: units map, z's moments (prior),
        # class shares
        self.data_map = AffineMap(D)
        for name, value in (
            ("data_mean", torch.zeros(D)),
            ("data_cov", torch.eye(D)),
            ("class_freq", torch.full((K,), 1.0 / max(K, 1))),
            ("data_stats_set", torch.tensor(False)),
        ):
            self.register_buffer(name, value)

    def points(self, x):
        """A user's (B, D) points (tensor, numpy array or nested list) as a tensor, refusing any other shape."""
        x, D = as_tensor(x, "x"), self.cfg.data_dim
        if x.ndim != 2 or x.shape[1] != D:
            raise ValueError(
                f"this Denoiser takes {D}-D points, (B, {D}) (DenoiserConfig.data_dim={D}), not {tuple(x.shape)}; "
                "build one for yours"
            )
        return x

    def condition(self, y, n):
        """A user's conditions for n rows as a tensor: (n,) labels in 0..K-1, or (n, C) numbers; one label or one
        vector of C numbers stands for every row. Label K is the null condition, which only drop selects."""
        K, C = self.cfg.num_classes, self.cfg.cond_dim
        if y is None:
            return None
        if not self.conditional:
            raise ValueError(
                "this Denoiser is unconditional (num_classes=0, cond_dim=0), so it takes no y; build one with "
                "num_classes or cond_dim"
            )
        y = as_tensor(y, "y")
        if (K and y.ndim == 0) or (C and y.shape == (C,)):
            y = y.expand((n,) if K else (n, C))
        shape, kind = (
            ((n,), f"integer labels in 0..{K - 1} for num_classes={K}")
            if K
            else ((n, C), f"float conditions for cond_dim={C}")
        )
        if y.shape != shape or y.dtype.is_floating_point != bool(C) or y.dtype == torch.bool:
            raise ValueError(f"y must be {shape} {kind}, but got {y.dtype} of shape {tuple(y.shape)}")
        if K and len(y) and not 0 <= int(y.min()) <= int(y.max()) < K:
            bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
            raise ValueError(f"label {bad} is out of range for num_classes={K}: use 0..{K - 1}")
        require((C and not torch.isfinite(y).all(), "y holds NaN or infinite conditions; give finite numbers"))
        return y

    @torch.no_grad()
    def set_data_stats(self, x, y=None, standardize=True, moments=True):
        """Learn in float64, before AveragedModel copies the model, what loss and samplers need about training points x
        (N, D) and conditions y. standardize: the model works on z = (x - shift) / scale at mean 0, sd MODEL_SD, so any
        offset and scale meet the tuned settings. moments: z's mean and covariance (per class; a linear fit on numbers)
        for the sampler's start (False: 0 and I); class_freq, cond_map."""
        x = self.points(x).detach().cpu().double()
        require(
            (not torch.isfinite(x).all(), "x holds NaN or infinite values; remove those points first"),
            (
                self.conditional and y is None,
                "this Denoiser is conditional: give the training points' conditions too, set_data_stats(x, y)",
            ),
        )
        y = self.condition(y, len(x))  # checked before any buffer changes
        y = None if y is None else y.detach().cpu()
        D, sd = x.shape[1], x.std(0, correction=0)
        sd = torch.where(sd > 0, sd, sd.max() if sd.max() > 0 else 1.0)
        self.data_map.set(*((x.mean(0), sd / MODEL_SD) if standardize else (torch.zeros(D), torch.ones(D))))
        z = self.data_map.to_model(x).double()
        stats = lambda z: (
            (z.mean(0), (z - z.mean(0)).T @ (z - z.mean(0)) / len(z))
            if moments and len(z)
            else (torch.zeros(D), torch.eye(D))
        )
        mean, cov = stats(z)
        self.data_mean.copy_(mean), self.data_cov.copy_(cov)
        if y is not None:
            if self.cfg.num_classes:
                self.class_freq.copy_(torch.bincount(y, minlength=self.cfg.num_classes + 1)[:-1] / len(y))
                for k in range(self.cfg.num_classes + 1):
                    self.class_mean[k], self.class_cov[k] = (
                        stats(z[y == k]) if k < self.cfg.num_classes and (y == k).sum() > 1 else (mean, cov)
                    )
            else:
                sd = y.double().std(0, correction=0)
                self.cond_map.set(y.double().mean(0), torch.where(sd > 0, sd, 1.0))
                c = self.cond_map.to_model(y.double()).double()
                coef = (
                    torch.linalg.lstsq(c, z - mean).solution
                    if moments
                    else torch.zeros(c.shape[1], D, dtype=torch.float64)
                )
                self.cond_coef.copy_(coef)
                self.cond_cov.copy_(stats(z - c @ coef)[1] if moments else torch.eye(D))
        self.data_stats_set.fill_(True)

    def start_moments(self, y=None):
        """(mean, cov, groups) for NoiseScheduler.prior given conditions y: each label's class moments, a linear fit on
        the numbers, or the data's. x_T keeps 60% of the signal (T = 100), so a start with the data's moments would pull
        every class to the others."""
        if y is None or not self.conditional:
            return self.data_mean, self.data_cov, None
        if self.cfg.num_classes:
            return self.class_mean, self.class_cov, y
        return (
            self.data_mean + self.cond_map.to_model(y) @ self.cond_coef,
            self.cond_cov,
            torch.arange(len(y), device=y.device),
        )

    def condition_token(self, y, drop, n):
        """(B, E): the condition's token; the learned null condition where drop is True, or everywhere if y is None."""
        null = torch.ones(n, dtype=torch.bool, device=self.data_mean.device)
        drop = null if y is None else (~null if drop is None else drop.to(null.device))
        if self.cfg.num_classes:
            return self.label_emb(torch.where(drop, self.cfg.num_classes, 0 if y is None else y.long()))
        c = torch.zeros(n, self.cfg.cond_dim, device=null.device) if y is None else self.cond_map.to_model(y)
        return torch.where(drop[:, None], self.null_cond, self.cond_emb(c))

    def forward(self, x, t, y=None, drop=None):
        require(
            (
                self.data_mean.dtype in (torch.float16, torch.bfloat16),
                f"this Denoiser was cast to {self.data_mean.dtype}; keep it in float32 or float64 (its map to data "
                "units needs it) and use torch.autocast for lower precision, as train.py --dtype bf16 does",
            )
        )
        x = self.points(x).to(self.data_mean.device)
        y, t = self.condition(y, len(x)), as_tensor(t, "t").to(x.device)
        t = t.expand(len(x)) if t.ndim == 0 else t  # one timestep for every row
        require(
            (
                t.shape != x.shape[:1],
                f"t must hold one timestep per point, shape ({x.shape[0]},), but has shape {tuple(t.shape)}",
            )
        )
        tokens = [self.coord_emb(x[:, i]) for i in range(x.shape[1])] + [self.time_emb(t)]
        tokens = torch.stack(
            tokens + ([self.condition_token(y, drop, len(x))] if self.conditional else []), 1
        )  # (B, D + 1 (+ 1), E)
        for block in self.attn:
            tokens = block(tokens)
        if len(self.ssm):
            tokens = tokens + self.ssm_out(self.ssm_stack(self.ssm_in(tokens)))
        return self.mlp(tokens.flatten(1))  # (B, tokens * E) -> (B, D)

    def ssm_stack(self, h):
        """DiS / U-ViT long skips: block i of the shallow half feeds block n-1-i of the deep half."""
        n, n_skip, shallow = len(self.ssm), len(self.skips), []
        for i, block in enumerate(self.ssm):
            if i >= n - n_skip:  # deep half: concat the matching shallow output, then Linear
                h = self.skips[n - 1 - i](torch.cat([h, shallow.pop()], -1))
            h = block(h)
            if i < n_skip:
                shallow.append(h)
        return h


# -----------------------------------------------------------------------------
# 7. Loss


def unwrap(model):
    """The Denoiser inside AveragedModel, DDP (.module) or torch.compile (._orig_mod), for its data statistics; others
    as they are."""
    while (
        isinstance(model, nn.Module)
        and not isinstance(model, Denoiser)
        and {"module", "_orig_mod"} & set(model._modules)
    ):
        model = model._modules.get("module", model._modules.get("_orig_mod"))
    return model


def sample_timesteps(n, T, low_t=2, low_frac=0.25, generator=None, device=None):
    """t ~ U{0..T-1} for n points, the first round(low_frac n) from U{0..low_t-1}, for sharp detail (docs/tuning.md
    "Circle"); train.py's defaults."""
    t = torch.randint(0, T, (n,), device=device, generator=generator)
    if (k := round(low_frac * n)) > 0:
        t[:k] = torch.randint(0, low_t, (k,), device=device, generator=generator)
    return t


LOSS_WEIGHTINGS = ("target", "epsilon")


def ddpm_loss(
    model, scheduler, x0, t=None, noise=None, y=None, p_uncond=0.1, drop=None, generator=None, weighting="target"
):
    """L_simple (Ho et al. eq. 14) for x0 (B, D) in data units; t ~ U{0..T-1}, noise ~ N(0, I) unless given.
    weighting "target": the MSE between the network's output and scheduler.get_target (the noise, v or x_0);
    "epsilon": the MSE between the noise the output implies (scheduler.convert) and the noise, whatever the network
    predicts: on the logsnr schedule, with t uniform, that is the variational bound's weighting (Kingma et al. 2021,
    eq. 17, whose weight d lambda / dt is then constant); for v it is the "target" MSE times alpha_t^2.
    With conditions y a row gets the null condition with probability p_uncond (or where drop is True): both halves
    of guidance."""
    require((weighting not in LOSS_WEIGHTINGS, f"unknown weighting {weighting!r}; use target or epsilon"))
    net = unwrap(model)
    if isinstance(net, Denoiser):
        require(
            (
                not net.data_stats_set,
                "call model.set_data_stats(x_train) before training, to fix the map from your data's units to the "
                "model's",
            ),
            (not 0 <= p_uncond <= 1, f"p_uncond {p_uncond} must be a probability in [0, 1]"),
        )
        x0 = net.points(x0)  # before the map, which would broadcast a (B, 1) batch to (B, D)
        require((not torch.isfinite(x0).all(), "x0 holds NaN or infinite values; remove those points first"))
        x0 = net.data_map.to_model(x0.to(net.data_mean.device))
        y = net.condition(y, len(x0))
        y = None if y is None else y.to(x0.device)
    T = scheduler.num_train_timesteps
    require((len(x0) == 0, "x0 holds no points; give at least one"))
    if t is None:
        t = sample_timesteps(len(x0), T, low_frac=0.0, generator=generator, device=x0.device)
    t = as_tensor(t, "t").to(x0.device)
    require(
        (t.is_floating_point() or t.dtype == torch.bool, f"t must hold integer timesteps in 0..{T - 1}, not {t.dtype}"),
        (t.ndim > 1 or (t.ndim == 1 and len(t) != len(x0)), f"t must be one timestep or one per point ({len(x0)})"),
        (len(t.view(-1)) and not 0 <= int(t.min()) <= int(t.max()) < T, f"t must lie in 0..{T - 1}"),
    )
    t = t.expand(len(x0))
    if noise is None:
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    noise = as_tensor(noise, "noise").to(x0)
    require(
        (noise.shape != x0.shape, f"noise must have x0's shape {tuple(x0.shape)}, not {tuple(noise.shape)}"),
        (not torch.isfinite(noise).all(), "noise holds NaN or infinite values"),
    )
    x_t = scheduler.add_noise(x0, noise, t)
    if y is not None and drop is None:
        drop = torch.rand(len(x0), device=x0.device, generator=generator) < p_uncond
    out = model(x_t, t) if y is None else model(x_t, t, y, drop)
    if weighting == "epsilon":
        alpha, sigma = scheduler.sqrt_alphas_cumprod[t, None], scheduler.sqrt_one_minus_alphas_cumprod[t, None]
        return F.mse_loss(scheduler.convert(out, x_t, alpha, sigma)[1], noise)
    return F.mse_loss(out, scheduler.get_target(x0, noise, t))


# -----------------------------------------------------------------------------
# 8. Samplers

SAMPLERS = ("ddpm", "ddim", "dpm++")
DEFAULT_STEPS = {"dpm++": 20}  # network evaluations when steps is not given; the others use all T


def draw_labels(model, n, generator=None, device=None):
    """n labels of a class-conditional Denoiser, drawn in its training data's proportions (class_freq)."""
    net = unwrap(model)
    require(
        (
            not isinstance(net, Denoiser) or not net.cfg.num_classes,
            "draw_labels needs a class-conditional Denoiser (num_classes=K)",
        )
    )
    require((not whole(n) or n < 1, f"n {n!r} must be a whole number of labels, at least 1"))
    freq = net.class_freq.to(
        generator.device if generator is not None else "cpu"
    ).double()  # drawn where the generator lives
    return torch.multinomial(freq, n, replacement=True, generator=generator).to(device or "cpu")


def guided_output(model, x, t, y=None, guidance=1.0):
    """out(null) + w (out(y) - out(null)) of the network's outputs, both in one batch: w = 1 conditional, 0
    unconditional, > 1 guided (Ho & Salimans eq. 6 with w = 1 + theirs). For every prediction_type this is the same
    guidance, as eps, v and x_0 are affine in the output with the same coefficients for both halves."""
    if isinstance(t, int):  # every row's timestep
        t = torch.full((len(x),), t, device=x.device, dtype=torch.long)
    if y is None or guidance == 1:
        return model(x, t) if y is None else model(x, t, y)
    drop = torch.arange(2 * len(x), device=x.device) >= len(x)  # the second half is unconditional
    out_cond, out_null = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), drop).chunk(2)
    return out_null + guidance * (out_cond - out_null)


@torch.no_grad()
def sample(
    model,
    scheduler,
    n,
    sampler="ddpm",
    steps=None,
    eta=0.0,
    generator=None,
    device=None,
    y=None,
    guidance=1.0,
    return_trajectory=False,
    batch_size=None,
    dim=None,
    callback=None,
):
    """n points (n, D) in data units (float64; float32 on MPS), or their (steps + 1, n, D) trajectory on the CPU, from
    scheduler.prior with start_moments (else N(0, I_dim)); one network call per timestep, the last returning its x_0.
    sampler: "ddpm" ancestral (DDIM, eta=1, if steps < T), "ddim" strided with eta, "dpm++" DPM-Solver++(2M) SDE, 20
    steps even in log-SNR. y: conditions (None: labels drawn in the training shares); guidance: w of guided_output;
    batch_size: rows per call (default 1024 on CPU, else n; twice that with guidance)."""
    T, net = scheduler.num_train_timesteps, unwrap(model)
    conditional = isinstance(net, Denoiser) and net.conditional
    require(
        (sampler not in SAMPLERS, f"unknown sampler {sampler!r}; use ddpm, ddim or dpm++"),
        (not whole(n) or n < 1, f"n {n!r} must be a whole number of points, at least 1"),
        (steps is not None and not whole(steps), f"steps {steps!r} must be a whole number"),
        (not 0 <= eta <= 1, f"eta {eta} must be in [0, 1]"),
        (batch_size is not None and batch_size < 1, f"batch_size {batch_size} must be >= 1"),
        (
            isinstance(net, Denoiser) and not net.data_stats_set,
            "call model.set_data_stats(x_train) first: sampling needs its map to data units",
        ),
        (
            guidance != 1 and not (conditional and (y is not None or net.cfg.num_classes)),
            f"guidance {guidance} needs a conditional Denoiser",
        ),
        (
            not (math.isfinite(guidance) and guidance >= 0),
            f"guidance {guidance} must be a number >= 0 (1: conditional, 0: not)",
        ),
    )
    device = device or next(iter(model.parameters()), torch.empty(0)).device
    steps = min(DEFAULT_STEPS.get(sampler, T), T) if steps is None else steps
    timesteps = scheduler.set_timesteps(steps, "logsnr" if sampler == "dpm++" else "linear")
    if conditional and y is None and net.cfg.num_classes:
        y = draw_labels(net, n, generator, device)
    if y is not None:
        y = net.condition(y, n).to(device)
    mean, cov, groups = (
        net.start_moments(y if guidance > 0 else None)
        if isinstance(net, Denoiser)
        else (getattr(net, "data_mean", None), getattr(net, "data_cov", None), None)
    )
    x = scheduler.prior(n, mean, cov, generator, device, dim, groups)
    to_data = net.data_map.to_data if isinstance(net, Denoiser) else (lambda z: z)
    trajectory = [to_data(x).cpu()] if return_trajectory else None
    x0_last = t_last = None
    batch_size = batch_size or (1024 if x.device.type == "cpu" else n)
    for i, (t, t_prev) in enumerate(zip(timesteps, timesteps[1:] + [-1])):
        t_rows = torch.full((batch_size,), t, device=device, dtype=torch.long)
        out = torch.cat(
            [
                guided_output(model, rows, t_rows[: len(rows)], None if y is None else y[j : j + len(rows)], guidance)
                for j, rows in zip(range(0, n, batch_size), x.split(batch_size))
            ]
        )
        if sampler == "ddpm" and steps == T:
            x = scheduler.step(out, t, x, generator=generator)
        elif sampler == "dpm++":
            x0 = scheduler.predict_x0(out, t, x)
            # the step into t = 0 is first order: log-SNR steps are uneven there (cf. diffusers' lower_order_final)
            x = (
                x0
                if t_prev < 0
                else scheduler.dpm_solver_step(x0, t, t_prev, x, x0_last if t_prev > 0 else None, t_last, generator)
            )
            x0_last, t_last = x0, t
        else:
            x = scheduler.ddim_step(out, t, t_prev, x, eta=1.0 if sampler == "ddpm" else eta, generator=generator)
        if return_trajectory:
            trajectory.append(to_data(x).cpu())
        if callback is not None:
            callback(i, len(timesteps))
    return torch.stack(trajectory) if return_trajectory else to_data(x)


# -----------------------------------------------------------------------------
# 9. Fast paths: the same results as the main text, computed faster where it matters


def fast_attention(q, k, v):
    """attention(q, k, v) by torch's fused kernel, or for a few tokens on the CPU by broadcasts, faster there
    (docs/performance.md)."""
    if q.shape[2] <= 4 and q.device.type == "cpu":
        q, k, v = (u.transpose(1, 2) for u in (q, k, v))  # (B, L, nh, hs)
        weights = ((q.unsqueeze(2) * k.unsqueeze(1)).sum(-1) * q.shape[-1] ** -0.5).softmax(2)  # (B, Lq, Lk, nh)
        return (weights.unsqueeze(-1) * v.unsqueeze(1)).sum(2).transpose(1, 2)  # (B, nh, Lq, hs)
    return F.scaled_dot_product_attention(q, k, v)
