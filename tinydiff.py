"""tinydiff: denoising diffusion on low-dimensional points (2-D, 3-D, ... D-D), in one file.

Read top to bottom, in the order of the math:
  1. NoiseScheduler      DDPM forward process, posterior step, DDIM step (Ho et al. 2020, arXiv:2006.11239;
                         Song et al. 2021, arXiv:2010.02502; cosine: Nichol & Dhariwal 2021, arXiv:2102.09672)
  2. SinusoidalEmbedding (Vaswani et al. 2017), as the 2-D MLP denoiser of tiny-diffusion uses it
  3. SelfAttention       multi-head, pre-norm, over the tokens [x1, ..., xD, t]
  4. ResidualBlock       x + GELU(Linear(x)) (tiny-diffusion), or the study's x + Linear(ReLU(x))
  5. BiMambaBlock        bidirectional selective state space, exact product-only scan (Mamba: Gu & Dao 2023,
                         arXiv:2312.00752; Vision Mamba: arXiv:2401.09417; DiS: Fei et al. 2024, arXiv:2402.05608)
  6. Denoiser            embeddings -> optional attention / SSM token mixers -> residual MLP;
                         keeps the data's affine map (any offset and scale) and moments
  7. ddpm_loss           simple noise-prediction MSE (Ho et al. eq. 14), low-t oversampling
  8. sample              DDPM ancestral, strided DDIM and DPM-Solver++(2M) samplers
  9. checkpoints         atomic save, safe load (weights_only)
Depends on torch and the Python standard library only, so that it can be copied alone.
"""
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. Noise scheduler


class NoiseScheduler(nn.Module):
    """Forward process q(x_t | x_0) and the reverse steps. Names follow diffusers.

    Schedules are computed in float64, kept as float32 buffers (`.to(device)` moves them), and derived from the
    arguments, so not saved in a state_dict. At T=100 the linear schedule ends at alpha_bar_T ~ 0.36, not ~0:
    x_T still holds sqrt(0.36) = 60% of the data's signal, so `prior` draws x_T from q(x_T)'s moments, not N(0, I).
    """

    def __init__(self, num_train_timesteps=100, beta_start=1e-4, beta_end=0.02, beta_schedule="linear"):
        super().__init__()
        T = self.num_train_timesteps = num_train_timesteps
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        elif beta_schedule == "quadratic":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        elif beta_schedule == "cosine":  # Nichol & Dhariwal eq. 17, s = 0.008, betas capped at 0.999
            f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}; use linear, quadratic or cosine")
        alphas = 1 - betas
        ab = torch.cumprod(alphas, 0)  # alpha_bar_t
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        buffers = dict(
            betas=betas,
            alphas_cumprod=ab,
            sqrt_alphas_cumprod=ab.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1 - ab).sqrt(),
            # posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t)   (eqs. 6-7)
            posterior_variance=betas * (1 - ab_prev) / (1 - ab),
            posterior_mean_coef1=betas * ab_prev.sqrt() / (1 - ab),
            posterior_mean_coef2=(1 - ab_prev) * alphas.sqrt() / (1 - ab),
            log_snr=0.5 * torch.log(ab / (1 - ab)),  # lambda_t = log(alpha_t / sigma_t), for DPM-Solver
        )
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    @property
    def alpha_bar_T(self):
        return self.alphas_cumprod[-1].item()

    def prior(self, n, mean=None, cov=None, generator=None, device="cpu", dim=None):
        """Draw x_T (n, D) for sampling. x_T = sqrt(ab_T) x_0 + sqrt(1 - ab_T) eps has mean sqrt(ab_T) mean
        and covariance ab_T cov + (1 - ab_T) I, where mean (D,) and cov (D, D) are the data's; we draw
        from the Gaussian with those moments. Without them (give dim = D), or with 0 and I, this is N(0, I) exactly."""
        if mean is None and dim is None:
            raise ValueError("prior needs the data's mean and cov, or dim (coordinates per point) for the standard N(0, I) start")
        D = dim if mean is None else len(mean)
        z = torch.randn((n, D), generator=generator, device=device)
        if mean is None:
            return z
        ab, mean, cov = (v.detach().cpu().double() for v in (self.alphas_cumprod[-1], mean, cov))  # small: on the CPU (MPS has no float64)
        L = torch.linalg.cholesky(ab * cov + (1 - ab) * torch.eye(D, dtype=torch.float64))
        return (ab.sqrt() * mean).float().to(device) + z @ L.T.float().to(device)

    def add_noise(self, x0, noise, t):
        """Sample q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I)   (eq. 4). t: (B,) long."""
        return self.sqrt_alphas_cumprod[t, None] * x0 + self.sqrt_one_minus_alphas_cumprod[t, None] * noise

    def predict_x0(self, model_output, t, x_t):
        """x_0 from the noise prediction, inverting eq. 4 (DDPM eq. 15, DDIM eq. 12). No clipping:
        the model's data span about +-4, and clamping to [-1, 1] would destroy them."""
        return (x_t - self.sqrt_one_minus_alphas_cumprod[t] * model_output) / self.sqrt_alphas_cumprod[t]

    def step(self, model_output, t, x_t, generator=None):
        """One DDPM ancestral step x_t -> x_{t-1} with the fixed_small variance beta_tilde_t."""
        # 1. predicted original sample (eq. 15)
        x0 = self.predict_x0(model_output, t, x_t)
        # 2. posterior mean (eq. 7)
        mean = self.posterior_mean_coef1[t] * x0 + self.posterior_mean_coef2[t] * x_t
        if t == 0:  # beta_tilde_0 = 0
            return mean
        # 3. add noise with variance beta_tilde_t
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return mean + self.posterior_variance[t].sqrt() * noise

    def set_timesteps(self, num_inference_steps, spacing="linear"):
        """num_inference_steps distinct timesteps from T-1 down to 0 (both ends included), evenly spaced
        in t (spacing="linear") or in log-SNR lambda_t ("logsnr": more steps at low noise, where detail forms)."""
        T = self.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"steps must be in 1..{T}, got {num_inference_steps}")
        if spacing == "linear":
            return torch.linspace(T - 1, 0, num_inference_steps).round().long().tolist()
        if spacing != "logsnr":
            raise ValueError(f"unknown spacing {spacing!r}; use linear or logsnr")
        lam = self.log_snr.double()
        targets = torch.linspace(lam[-1].item(), lam[0].item(), num_inference_steps, dtype=torch.float64)
        ts = (lam[None, :] - targets[:, None]).abs().argmin(1).tolist()
        n = len(ts)  # make them distinct: leave room below each, then step down by at least 1
        ts = [max(t, n - 1 - i) for i, t in enumerate(ts)]
        for i in range(1, n):
            ts[i] = min(ts[i], ts[i - 1] - 1)
        return ts

    def ddim_step(self, model_output, t, t_prev, x_t, eta=0.0, generator=None):
        """One DDIM step x_t -> x_{t_prev} (t_prev = -1 means the clean sample, alpha_bar = 1)."""
        ab_t = self.alphas_cumprod[t]
        ab_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(ab_t)
        # 1. predicted original sample (eq. 12)
        x0 = self.predict_x0(model_output, t, x_t)
        # 2. sigma_t(eta) (eq. 16): eta = 1 gives the DDPM posterior variance, eta = 0 is deterministic
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()
        # 3. direction pointing to x_t, then the update (eq. 12)
        prev = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * model_output
        if eta > 0 and t_prev >= 0:
            prev = prev + sigma * torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return prev

    def dpm_solver_step(self, x0, t, s, x_t, x0_last=None, t_last=None, generator=None):
        """One DPM-Solver++(2M) SDE step x_t -> x_s, s < t (Lu et al. 2022, data prediction).

        With alpha = sqrt(ab), sigma = sqrt(1 - ab) and h = lambda_s - lambda_t, the linear part is
        integrated exactly: x_s = sigma_s/sigma_t e^-h x_t + alpha_s (1 - e^-2h) D + sigma_s sqrt(1 - e^-2h) z.
        D is x0 extrapolated linearly in lambda through the previous step's x0_last (at t_last);
        without it the step is first order, which is exactly the DDPM posterior step from t to s.
        """
        lam = self.log_snr
        h = lam[s] - lam[t]
        D = x0 if x0_last is None else x0 + (x0 - x0_last) * h / (2 * (lam[t] - lam[t_last]))
        z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        sigma_s = self.sqrt_one_minus_alphas_cumprod[s]
        return (sigma_s / self.sqrt_one_minus_alphas_cumprod[t] * torch.exp(-h) * x_t
                - self.sqrt_alphas_cumprod[s] * torch.expm1(-2 * h) * D + sigma_s * (-torch.expm1(-2 * h)).sqrt() * z)


# -----------------------------------------------------------------------------
# 2. Sinusoidal embedding


class SinusoidalEmbedding(nn.Module):
    """(B,) -> (B, dim): [sin(s x w_i), cos(s x w_i)], w_i = exp(-ln(10000) i / (half - 1))."""

    def __init__(self, dim, scale=1.0):
        super().__init__()
        half = dim // 2
        self.scale = scale
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / (half - 1)), persistent=False)

    def forward(self, x):
        arg = (x.float() * self.scale)[:, None] * self.freqs  # (B, half)
        return torch.cat([arg.sin(), arg.cos()], dim=-1)


# -----------------------------------------------------------------------------
# 3-4. Attention and residual MLP blocks


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention with a residual: x + proj(attn(LN(x)))."""

    def __init__(self, dim, heads):
        super().__init__()
        if heads < 1 or dim % heads:
            divisors = [h for h in range(1, dim + 1) if dim % h == 0]
            raise ValueError(f"heads {heads} must divide the token width {dim}; use one of {', '.join(map(str, divisors))}")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, L, 3, self.heads, D // self.heads).unbind(2)  # each (B, L, nh, hs)
        if L <= 4 and x.device.type == "cpu":
            # a few tokens on CPU: plain broadcasts beat SDPA's kernels (the denoiser's 3 tokens with
            # 16 heads: 1.2x faster per training step; README "Performance")
            w = ((q.unsqueeze(2) * k.unsqueeze(1)).sum(-1) * q.shape[-1] ** -0.5).softmax(2)  # (B, Lq, Lk, nh)
            y = (w.unsqueeze(-1) * v.unsqueeze(1)).sum(2)  # (B, L, nh, hs)
        else:
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return x + self.proj(y.reshape(B, L, D))


class ResidualBlock(nn.Module):
    """x + GELU(Linear(x)) (form="gelu", tiny-diffusion's) or x + Linear(ReLU(x)) (form="relu", the study's)."""

    def __init__(self, dim, form="gelu"):
        super().__init__()
        self.ff = nn.Linear(dim, dim)
        self.pre_relu = form == "relu"

    def forward(self, x):
        return x + self.ff(F.relu(x)) if self.pre_relu else x + F.gelu(self.ff(x))


# -----------------------------------------------------------------------------
# 5. Bidirectional selective state space block
#
# The recurrence h_t = a_t * h_{t-1} + b_t is computed with products and sums only: the popular
# cumsum(log a) / exp trick overflows or loses precision for long sequences (NaN for L >= 64 at
# Mamba's own init), so it is not used.


def scan_parallel(a, b):
    """h_t = a_t h_{t-1} + b_t along dim 1 (h_{-1} = 0) by odd/even reduction: 2 log2(L) batched
    steps of products and sums. The path for GPUs and long sequences."""
    L = a.shape[1]
    if L == 1:
        return b
    if L % 2:  # pad with the identity element (a=1, b=0)
        a, b = torch.cat([a, torch.ones_like(a[:, :1])], 1), torch.cat([b, torch.zeros_like(b[:, :1])], 1)
    a_even, a_odd, b_even, b_odd = a[:, 0::2], a[:, 1::2], b[:, 0::2], b[:, 1::2]
    # composing steps 2i and 2i+1 gives a recurrence over pairs whose states are h_1, h_3, ...
    h_odd = scan_parallel(a_odd * a_even, a_odd * b_even + b_odd)
    # then h_{2i} = a_{2i} h_{2i-1} + b_{2i}, with h_0 = b_0
    h_even = torch.cat([b_even[:, :1], a_even[:, 1:] * h_odd[:, :-1] + b_even[:, 1:]], 1)
    return torch.stack([h_even, h_odd], 2).flatten(1, 2)[:, :L]  # interleave -> (B, L, ...)


def selective_scan(dt, A, B, C, x, parallel=None):
    """Mamba's selective scan: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,  y_t = C_t h_t.

    dt, x: (B, L, D); A: (N, D); B, C: (B, L, N) -> y: (B, L, D). The state h is (B, N, D), D last
    so that every broadcast runs over contiguous memory. parallel=None picks the fused sequential
    loop on CPU and for short sequences (fastest there at every L measured), and the parallel scan
    on GPU for L > 16.
    """
    if parallel is None:
        parallel = x.is_cuda and x.shape[1] > 16
    a = lambda dt_: torch.exp(dt_.unsqueeze(-2) * A)  # zero-order hold of A, in (0, 1]
    b = lambda dt_, B_, x_: (dt_ * x_).unsqueeze(-2) * B_.unsqueeze(-1)  # Euler step for B, as in Mamba
    if parallel:
        h = scan_parallel(a(dt), b(dt, B, x))  # (B, L, N, D)
        return (h * C.unsqueeze(-1)).sum(-2)
    h, ys = torch.zeros_like(x[:, 0]).unsqueeze(-2), []
    for dt_t, B_t, C_t, x_t in zip(dt.unbind(1), B.unbind(1), C.unbind(1), x.unbind(1)):
        h = a(dt_t) * h + b(dt_t, B_t, x_t)  # (B, N, D)
        ys.append((h * C_t.unsqueeze(-1)).sum(-2))
    return torch.stack(ys, 1)


class SelectiveSSM(nn.Module):
    """One direction of Mamba's mixer after in_proj: causal depthwise conv -> SiLU -> selective scan."""

    def __init__(self, d_inner, d_state, dt_rank, d_conv=4, dt_min=1e-3, dt_max=1e-1):
        super().__init__()
        self.dt_rank, self.d_state = dt_rank, d_state
        # depthwise causal Conv1d, as K shifted multiply-adds (nn.Conv1d's backward is slow on CPU here)
        self.conv_weight = nn.Parameter(torch.empty(d_conv, d_inner).uniform_(-(d_conv**-0.5), d_conv**-0.5))
        self.conv_bias = nn.Parameter(torch.empty(d_inner).uniform_(-(d_conv**-0.5), d_conv**-0.5))
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner)
        nn.init.uniform_(self.dt_proj.weight, -(dt_rank**-0.5), dt_rank**-0.5)
        # dt ~ log-uniform [dt_min, dt_max]; the bias is its inverse softplus, so softplus(bias) = dt
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real init A = -(1..N) for every channel, stored as (N, D) to match the state layout
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32))[:, None].repeat(1, d_inner))
        self.D = nn.Parameter(torch.ones(d_inner))

    def forward(self, x):  # (B, L, d_inner)
        L, K = x.shape[1], self.conv_weight.shape[0]
        xp = F.pad(x, (0, 0, K - 1, 0))  # (B, K-1+L, D): left padding makes the conv causal
        x = F.silu(self.conv_bias + sum(self.conv_weight[k] * xp[:, k : k + L] for k in range(K)))
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt))  # (B, L, D)
        y = selective_scan(dt, -torch.exp(self.A_log), B.contiguous(), C.contiguous(), x)
        return y + self.D * x  # D skip


class BiMambaBlock(nn.Module):
    """Pre-norm residual bidirectional Mamba block (Vision Mamba v2 / DiS).

    in_proj and out_proj are shared; each direction has its own conv, x_proj, dt_proj, A and D.
    The two directions are averaged (not summed), so the output scale does not depend on the
    number of directions; then gated with SiLU(z) and projected out.
    """

    def __init__(self, dim, d_state=8, expand=2, d_conv=4):
        super().__init__()
        d_inner, dt_rank = expand * dim, math.ceil(dim / 16)
        self.norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.forward_ssm = SelectiveSSM(d_inner, d_state, dt_rank, d_conv)
        self.backward_ssm = SelectiveSSM(d_inner, d_state, dt_rank, d_conv)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def forward(self, x):  # (B, L, dim)
        u, z = self.in_proj(self.norm(x)).chunk(2, dim=-1)  # each (B, L, d_inner)
        y = 0.5 * (self.forward_ssm(u) + self.backward_ssm(u.flip(1)).flip(1))
        return x + self.out_proj(y * F.silu(z))


# -----------------------------------------------------------------------------
# 6. Denoiser


MODEL_SD = 2.0  # set_data_stats(standardize=True): each coordinate's sd in the model's space (the named datasets' ~1.2-2.3)


@dataclass
class DenoiserConfig:
    data_dim: int = 2  # D, coordinates per point: one token each, plus the time token
    emb_dim: int = 128  # width of each sinusoidal embedding (= token width)
    hidden: int = 256  # width of the residual MLP
    hidden_layers: int = 3  # residual blocks
    block: str = "gelu"  # "gelu": Linear-GELU-blocks-Linear; "relu": the study's Linear-blocks-ReLU-Linear
    attn_layers: int = 0  # self-attention layers over the tokens [x1, ..., xD, t]
    heads: int = 4
    ssm_layers: int = 0  # bidirectional SSM blocks over the same tokens, with long skips
    ssm_dim: int = 64  # token width inside the SSM stack (d_inner = 2 * ssm_dim); see README
    d_state: int = 4  # SSM state size per channel
    coord_scale: float = 50.0  # sinusoidal scale for the coordinates (the study's: 25)
    time_scale: float = 1.0  # sinusoidal scale for the integer timestep


class Denoiser(nn.Module):
    """eps_theta(z_t, t): (B, D), (B,) -> (B, D), in the model's space z (see set_data_stats).

    Each coordinate and t is embedded into a token of width emb_dim; optional attention and SSM blocks
    mix the D + 1 tokens, which are then flattened ([x1, ..., xD, t]) into the residual MLP. At D = 2 with
    no mixers and block="relu" this is the study's MLPDenoiser exactly (block="gelu": tiny-diffusion's).
    The SSM stack follows DiS: time is a token, and long skips (concat + Linear, as in U-ViT) join the
    first half of the blocks to the second.
    """

    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.cfg = cfg
        D, E = cfg.data_dim, cfg.emb_dim
        if D < 1:
            raise ValueError(f"data_dim {D} must be at least 1: it is the number of coordinates per point")
        self.coord_emb = SinusoidalEmbedding(E, cfg.coord_scale)
        self.time_emb = SinusoidalEmbedding(E, cfg.time_scale)
        self.attn = nn.ModuleList(SelfAttention(E, cfg.heads) for _ in range(cfg.attn_layers))
        if cfg.ssm_layers:  # the SSM stack runs at width ssm_dim, as a residual branch on the tokens
            self.ssm_in, self.ssm_out = nn.Linear(E, cfg.ssm_dim), nn.Linear(cfg.ssm_dim, E)
        self.ssm = nn.ModuleList(BiMambaBlock(cfg.ssm_dim, cfg.d_state) for _ in range(cfg.ssm_layers))
        self.skips = nn.ModuleList(nn.Linear(2 * cfg.ssm_dim, cfg.ssm_dim) for _ in range(cfg.ssm_layers // 2))
        if cfg.block not in ("gelu", "relu"):
            raise ValueError(f"unknown block {cfg.block!r}; use gelu or relu")
        blocks = [ResidualBlock(cfg.hidden, cfg.block) for _ in range(cfg.hidden_layers)]
        if cfg.block == "relu":  # the study's MLPDenoiser: pre-activation blocks, one ReLU before the output
            self.mlp = nn.Sequential(nn.Linear((D + 1) * E, cfg.hidden), *blocks, nn.ReLU(), nn.Linear(cfg.hidden, D))
        else:
            self.mlp = nn.Sequential(nn.Linear((D + 1) * E, cfg.hidden), nn.GELU(), *blocks, nn.Linear(cfg.hidden, D))
        # What the model knows about its training data, saved with the weights (set_data_stats):
        # the affine map x = data_shift + data_scale * z between data units x and the model's space z,
        # and the mean and covariance of z, for the sampler's start (NoiseScheduler.prior).
        # The defaults (the identity map, 0 and I) mean raw coordinates and the standard N(0, I) start.
        self.register_buffer("data_mean", torch.zeros(D))
        self.register_buffer("data_cov", torch.eye(D))
        self.register_buffer("data_shift", torch.zeros(D))
        self.register_buffer("data_scale", torch.ones(D))

    def check_points(self, x):
        """Refuse anything but (B, D) points, in one sentence."""
        D = self.cfg.data_dim
        if x.ndim != 2 or x.shape[1] != D:
            raise ValueError(f"this Denoiser takes {D}-D points, (B, {D}) (DenoiserConfig.data_dim={D}), but got shape {tuple(x.shape)};"
                             f" give it points with {D} coordinates, or build a model for yours with DenoiserConfig(data_dim=...)")

    @torch.no_grad()
    def set_data_stats(self, x, standardize=True, moments=True):
        """Keep what the loss and the samplers need to know about the training points x (N, D), in data units.

        standardize=True: the model works on z = (x - data_shift) / data_scale, each coordinate at mean 0 and
        sd MODEL_SD, so points at any offset and scale meet the settings tuned on the study's data (False: raw).
        moments=True: data_mean and data_cov of z for NoiseScheduler.prior (False: 0 and I, i.e. N(0, I)).
        Call it before AveragedModel copies the model.
        """
        x = torch.as_tensor(x).detach().cpu().double()  # statistics in float64 on the CPU (MPS has no float64)
        self.check_points(x)
        D, sd = x.shape[1], x.std(0, correction=0)
        sd = torch.where(sd > 0, sd, sd.max() if sd.max() > 0 else 1.0)
        shift, scale = (x.mean(0).float(), (sd / MODEL_SD).float()) if standardize else (torch.zeros(D), torch.ones(D))
        z = (x - shift.double()) / scale.double()  # as to_model computes it
        mean = z.mean(0) if moments else torch.zeros(D, dtype=torch.float64)
        cov = (z - mean).T @ (z - mean) / len(z) if moments else torch.eye(D, dtype=torch.float64)
        for buffer, value in ((self.data_shift, shift), (self.data_scale, scale), (self.data_mean, mean), (self.data_cov, cov)):
            buffer.copy_(value.float())

    def to_model(self, x):
        """Data units -> the model's space: z = (x - data_shift) / data_scale (exact for the identity map)."""
        self.check_points(x)
        return (x - self.data_shift) / self.data_scale

    def to_data(self, z):
        """The model's space -> data units: x = data_shift + data_scale * z."""
        return self.data_shift + self.data_scale * z

    def forward(self, x, t):
        self.check_points(x)
        if t.shape != x.shape[:1]:
            raise ValueError(f"t must hold one timestep per point, shape ({x.shape[0]},), but has shape {tuple(t.shape)}")
        tokens = torch.stack([self.coord_emb(x[:, i]) for i in range(x.shape[1])] + [self.time_emb(t)], 1)  # (B, D+1, E)
        for block in self.attn:
            tokens = block(tokens)
        if len(self.ssm):
            tokens = tokens + self.ssm_out(self.ssm_stack(self.ssm_in(tokens)))
        return self.mlp(tokens.flatten(1))  # (B, (D+1)E) -> (B, D)

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
    """The Denoiser inside AveragedModel, DDP (.module) or torch.compile (._orig_mod), so that the loss
    and the samplers find its data statistics; any other module is returned as it is."""
    while isinstance(model, nn.Module) and not isinstance(model, Denoiser):
        inner = model._modules.get("module", model._modules.get("_orig_mod"))
        if inner is None:
            break
        model = inner
    return model


def ddpm_loss(model, scheduler, x0, generator=None, low_t=2, low_frac=0.25, rows=None):
    """L_simple (Ho et al. eq. 14): MSE between the true and predicted noise, t ~ U{0..T-1}.

    x0: (B, D) points in data units; a Denoiser first maps them to its own space (set_data_stats).
    low_frac > 0 redraws that share of the batch from t ~ U{0..low_t-1}: more signal for the last
    denoising steps, where sharp detail is decided (docs/tuning.md, "Circle"). The defaults are train.py's;
    low_frac=0 is the plain L_simple. rows (a slice): draw t and noise for the whole batch, return
    those rows' share of its mean (data-parallel ranks' shares sum to the one-process loss).
    """
    net = unwrap(model)
    if isinstance(net, Denoiser):
        x0 = net.to_model(x0)
    n = x0.shape[0]
    t = torch.randint(0, scheduler.num_train_timesteps, (n,), device=x0.device, generator=generator)
    k = round(low_frac * n)
    if k > 0:  # the batch's rows are in random order, so the first k are as good as any
        t[:k] = torch.randint(0, low_t, (k,), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    if rows is None:
        return F.mse_loss(model(scheduler.add_noise(x0, noise, t), t), noise)
    # these rows' share of the whole batch's mean (exact however the batch is split; 0 for no rows)
    x0, t, noise_rows = x0[rows], t[rows], noise[rows]
    return F.mse_loss(model(scheduler.add_noise(x0, noise_rows, t), t), noise_rows, reduction="sum") / noise.numel()


# -----------------------------------------------------------------------------
# 8. Samplers


SAMPLERS = ("ddpm", "ddim", "dpm++")
DEFAULT_STEPS = {"dpm++": 20}  # network evaluations when steps is not given; the others use all T


@torch.no_grad()
def sample(model, scheduler, n, sampler="ddpm", steps=None, eta=0.0, generator=None, device="cpu", return_trajectory=False,
           batch_size=None, dim=None, callback=None):
    """Draw n points in data units, starting from x_T ~ scheduler.prior with the model's data moments.

    sampler="ddpm": ancestral sampling over all T steps (steps < T: strided, i.e. DDIM with eta=1).
    sampler="ddim": strided DDIM over `steps` timesteps with the given eta (0: deterministic).
    sampler="dpm++": DPM-Solver++(2M) SDE over `steps` (default 20) timesteps spaced evenly in log-SNR.
    Each timestep is one network evaluation; the last (t = 0) returns its predicted x_0. Returns (n, D),
    or the trajectory (steps + 1, n, D) on the CPU with return_trajectory=True. model: a Denoiser, also
    wrapped (unwrap); any other module starts from its data_mean / data_cov if any, else N(0, I) with `dim` coordinates.
    batch_size: rows per network call (default 1024 on CPU, where they stay in cache, else all n);
    it changes the speed, not the samples. callback(i, steps) is called after each step.
    """
    T = scheduler.num_train_timesteps
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; use ddpm, ddim or dpm++")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be a positive number of rows (or None for the default)")
    steps = steps or DEFAULT_STEPS.get(sampler, T)
    timesteps = scheduler.set_timesteps(steps, "logsnr" if sampler == "dpm++" else "linear")
    net = unwrap(model)
    x = scheduler.prior(n, getattr(net, "data_mean", None), getattr(net, "data_cov", None), generator, device, dim)
    to_data = net.to_data if isinstance(net, Denoiser) else (lambda z: z)
    trajectory = [to_data(x).cpu()] if return_trajectory else None
    x0_last = t_last = None
    batch_size = batch_size or (1024 if x.device.type == "cpu" else n)
    for i, t in enumerate(timesteps):
        t_rows = torch.full((batch_size,), t, device=device, dtype=torch.long)
        eps = torch.cat([model(rows, t_rows[: len(rows)]) for rows in x.split(batch_size)])
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        if sampler == "ddpm" and steps == T:
            x = scheduler.step(eps, t, x, generator=generator)
        elif sampler == "dpm++":
            x0 = scheduler.predict_x0(eps, t, x)
            # the step into t = 0 is first order: log-SNR steps are uneven there (cf. diffusers' lower_order_final)
            x = x0 if t_prev < 0 else scheduler.dpm_solver_step(x0, t, t_prev, x, x0_last if t_prev > 0 else None, t_last, generator)
            x0_last, t_last = x0, t
        else:
            x = scheduler.ddim_step(eps, t, t_prev, x, eta=1.0 if sampler == "ddpm" else eta, generator=generator)
        if return_trajectory:
            trajectory.append(to_data(x).cpu())
        if callback is not None:
            callback(i, len(timesteps))
    return torch.stack(trajectory) if return_trajectory else to_data(x)


# -----------------------------------------------------------------------------
# 9. Checkpoints: plain tensors and Python types only, written atomically, read with weights_only


class CheckpointError(ValueError):
    """A file that is not a usable tinydiff checkpoint; the message says what to do."""


def atomic_write(path, write):
    """write(f) into a temporary file, then rename it over path: a crash at any moment leaves the
    old file intact, and a failed write (a full disk) removes the temporary file and re-raises."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path):
    """Read a tinydiff checkpoint safely; anything else raises one clear CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}; train one first with `python train.py --dataset dino`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # never runs code from the file
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable tinydiff checkpoint ({reason}); use a ckpt.pt written by train.py") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "tinydiff-1":
        raise CheckpointError(f"{path} is not a tinydiff checkpoint; use a ckpt.pt written by train.py")
    missing = [k for k in ("args", "model_config", "scheduler_config", "model", "ema", "step") if not isinstance(ckpt.get(k), (dict, int))]
    if missing or not isinstance(ckpt["args"].get("dataset"), str) or not isinstance(ckpt["args"].get("train_steps"), int):
        raise CheckpointError(f"{path} lacks parts of a tinydiff checkpoint ({', '.join(missing) or 'args'}); use a ckpt.pt written by train.py")
    return ckpt


def load_weights(model, state):
    """load_state_dict, strict, except that checkpoints from before the data-statistics buffers load
    with their defaults (the raw coordinates and the N(0, I) start they were made with). Weights for
    points with another number of coordinates are refused in one sentence."""
    D, d = model.cfg.data_dim, len(state["data_mean"]) if "data_mean" in state else 2  # 2: from before data_mean
    if d != D:
        raise ValueError(f"the weights are for {d}-D points but the model is built for {D}-D points; use data with {d} coordinates per point")
    defaults = dict(data_mean=torch.zeros(D), data_cov=torch.eye(D), data_shift=torch.zeros(D), data_scale=torch.ones(D))
    model.load_state_dict({**defaults, **state})


def model_from_checkpoint(ckpt, key="ema"):
    """Build the Denoiser and scheduler a checkpoint describes, with its EMA (or raw) weights."""
    try:
        known = {f.name for f in fields(DenoiserConfig)}
        cfg = DenoiserConfig(**{"data_dim": 2, **{k: v for k, v in ckpt["model_config"].items() if k in known}})  # 2: from before data_dim
        model = Denoiser(cfg)
        load_weights(model, ckpt[key])
        scheduler = NoiseScheduler(**ckpt["scheduler_config"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0][:120]
        raise CheckpointError(f"the checkpoint's weights do not fit its config ({reason}); it was written by an incompatible version") from None
    return model, scheduler

