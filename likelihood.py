"""Exact log-likelihood of a tinydiff model's probability-flow ODE (Song et al. 2021, arXiv:2011.13456, sec. 4.3
and app. D.2; the ODE is deterministic DDIM's, Song, Meng & Ermon 2021, arXiv:2010.02502, eq. 14).

Which density: the one of the deterministic map from the model's start distribution to data, i.e. of points
drawn by solving this ODE from x_T. It is NOT the density of the DDPM ancestral sampler's samples (a
different, stochastic process, whose samples' density has no tractable form). For a perfect noise predictor
and a prior equal to q(x_T), it is the data's density smoothed by N(0, sigma_bar_0^2 I) in model space.

The ODE. In x_bar = x_t / sqrt(ab_t) and sigma_bar = sqrt((1 - ab_t) / ab_t) (ab: alphas_cumprod),
DDIM's update becomes an Euler step of
    d x_bar / d sigma_bar = eps_theta(x_t, t(sigma_bar)),   x_t = x_bar / sqrt(1 + sigma_bar^2),
where t(sigma_bar) interpolates the integer timesteps linearly in log-SNR (= -2 log sigma_bar), and the
Denoiser's time embedding takes that fractional t. We integrate it in s = log sigma_bar (the same ODE,
d x_bar / ds = sigma_bar eps), so that steps are even where eps changes fastest, from sigma_bar_0 at the
first timestep t = 0 (ab_0 = 1 - beta_0, not 1: the model never saw t < 0) to sigma_bar_{T-1}. The data
point z (model space) is the ODE's state x_bar at sigma_bar_0, i.e. x_{t=0} = sqrt(ab_0) z.

Change of variables (instantaneous, Chen et al. 2018, arXiv:1806.07366, thm. 1):
    log p(z) = log p_xbar(x_bar_T) + int_{s_0}^{s_T} div_xbar f ds,    f = sigma_bar eps_theta,
    div_xbar f = sigma_bar sqrt(ab) div_x eps_theta,
    log p_xbar(x_bar_T) = log N(x_T; sqrt(ab_T) mu, ab_T Sigma + (1 - ab_T) I) + (D/2) log ab_T,  x_T = sqrt(ab_T)
    x_bar_T,
with mu, Sigma the moments the sampler starts from (Denoiser.start_moments: per class, a linear fit on numbers, or the
data's), and finally
log p(x) = log p(z) - sum log scale for the affine map x = shift + scale z (data_map).

Solver: scipy.integrate.solve_ivp, RK45, rtol = atol = 1e-5 by default, on each batch of points flattened into
one state (the error norm is over the batch, so a batch's accuracy is the tolerance's, not each point's).
Divergence: exact for D <= 8 (D backward passes), else Hutchinson's estimator with `probes` Rademacher
vectors drawn once per batch from `seed` (unbiased; its noise shrinks as 1/sqrt(probes)).
"""

import math

import numpy as np
import torch
from scipy.integrate import solve_ivp

import tinydiff

EXACT_DIV_MAX_D = 8  # exact divergence up to this many coordinates, Hutchinson above


def data_map(model, D):
    """(shift (D,), scale (D,)) float64 of the model's affine map x = shift + scale z between data units x and
    its space z: model.data_map.shift / .scale, else model.data_shift / .data_scale, else the identity."""
    net = tinydiff.unwrap(model)
    m = getattr(net, "data_map", None)
    if m is not None and hasattr(
        m, "shift"
    ):  # tinydiff's AffineMap keeps the offset as a float32 pair: add both halves in float64
        shift, scale = m.shift.double() + getattr(m, "shift_lo", torch.zeros(D)).double(), m.scale
    elif hasattr(net, "data_shift"):
        shift, scale = net.data_shift, net.data_scale
    else:
        shift, scale = torch.zeros(D), torch.ones(D)
    return shift.detach().cpu().double(), scale.detach().cpu().double()


class ProbabilityFlow:
    """The ODE's right-hand side for one batch: d[x_bar, delta]/ds = [sigma_bar eps, div_xbar(sigma_bar eps)]."""

    def __init__(self, model, scheduler, D, exact_div=True):
        self.model, self.D, self.exact_div = model, D, exact_div
        self.convert = getattr(scheduler, "convert", None)  # the network's output -> (x_0, eps), by prediction_type
        ab = scheduler.alphas_cumprod.detach().cpu().double().numpy()
        self.log_sigma = 0.5 * np.log((1 - ab) / ab)  # s at t = 0..T-1, increasing in t
        self.param = next(iter(model.parameters()), None)
        self.y = self.noise = None  # per batch: its labels, and Hutchinson's probe vectors
        self.evals, self.max_evals, self.progress = 0, None, None  # per batch: network calls, their budget, a report

    def t_of(self, s):
        """Fractional timestep at s = log sigma_bar: linear in log-SNR between the integer timesteps."""
        return float(np.interp(s, self.log_sigma, np.arange(len(self.log_sigma))))

    def eps(self, x_t, s):
        """The noise prediction at x_t and s = log sigma_bar, whatever the network outputs."""
        t = torch.full((len(x_t),), self.t_of(s), dtype=torch.float32, device=x_t.device)
        out = self.model(x_t, t) if self.y is None else self.model(x_t, t, self.y)
        if self.convert is None:
            return out
        alpha = 1 / math.sqrt(1 + math.exp(2 * s))
        return self.convert(out, x_t, alpha, alpha * math.exp(s))[1]

    def velocity(self, s, state):
        """d x_bar / ds only (flow: no divergence)."""
        sigma = math.exp(s)
        x_bar = torch.as_tensor(state, dtype=torch.float32, device=self.device).view(-1, self.D)
        with torch.no_grad():
            eps = self.eps(x_bar / math.sqrt(1 + sigma**2), s)
        return (sigma * eps).double().cpu().numpy().ravel()

    def __call__(self, s, state):
        self.evals += 1
        if self.max_evals is not None and self.evals > self.max_evals:
            raise OverBudget(self.evals)
        if self.progress is not None:
            self.progress(s)
        sigma = math.exp(s)
        sqrt_ab = 1 / math.sqrt(1 + sigma**2)
        n = len(state) // (self.D + 1)
        with torch.enable_grad():
            x_t = (
                torch.as_tensor(state[: n * self.D], dtype=torch.float32, device=self.device).view(n, self.D) * sqrt_ab
            )
            x_t.requires_grad_(True)
            eps = self.eps(x_t, s)  # (n, D)
            div = torch.zeros(n, dtype=torch.float64, device=x_t.device)
            if self.exact_div:  # points are independent, so d(sum_b eps_bi)/dx_t = d eps_bi / dx_bi per row
                for i in range(self.D):
                    g = torch.autograd.grad(eps[:, i].sum(), x_t, retain_graph=i + 1 < self.D)[0]
                    div += g[:, i].double()
            else:  # Hutchinson: tr J = E_v[v^T J v], v Rademacher, the same v over the whole solve
                for k, v in enumerate(self.noise):
                    g = torch.autograd.grad((eps * v).sum(), x_t, retain_graph=k + 1 < len(self.noise))[0]
                    div += (g * v).sum(1).double() / len(self.noise)
        dx = (sigma * eps).detach().double().cpu().numpy().ravel()
        ddelta = (sigma * sqrt_ab * div).cpu().numpy()  # div_xbar f = sigma sqrt(ab) div_x eps
        return np.concatenate([dx, ddelta])

    @property
    def device(self):
        return self.param.device if self.param is not None else torch.device("cpu")


class OverBudget(Exception):
    """The ODE solver spent its budget of network evaluations on one batch."""


class StiffFlow(ValueError):
    """nll's refusal of a flow the solver could not finish within its budget."""


MAX_EVALS = 20_000  # network evaluations per batch; the named datasets' trained models need a few hundred


def points(x):
    """(x as a float64 CPU tensor, D), refusing anything but (N, D) points in one sentence."""
    x = torch.as_tensor(x, dtype=torch.float64).cpu()
    if x.ndim != 2:
        raise ValueError(f"give points as an (N, D) array, one point per row; got shape {tuple(x.shape)}")
    return x, x.shape[1]


def batches(x, y, batch_size):
    """(rows of x, the same rows of y or None), batch_size rows at a time."""
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size], None if y is None else y[i : i + batch_size]


def start_log_prob(net, y, x_T, ab_T):
    """log density of the sampler's start at x_T (n, D): N(sqrt(ab_T) mu, ab_T Sigma + (1 - ab_T) I) with the moments
    the sampler uses for these conditions (Denoiser.start_moments: per class, or a linear fit on the numbers), else the
    model's data_mean / data_cov, else 0 and I."""
    D = x_T.shape[1]
    if hasattr(net, "start_moments"):  # the conditions on the model's device, where its buffers are
        mean, cov, groups = net.start_moments(None if y is None else torch.as_tensor(y).to(net.data_mean.device))
    else:
        mean, cov, groups = getattr(net, "data_mean", torch.zeros(D)), getattr(net, "data_cov", torch.eye(D)), None
    mean, cov = mean.detach().cpu().double(), cov.detach().cpu().double()
    if groups is not None:
        groups = groups.cpu()
        mean, cov = mean[groups], cov[groups] if cov.ndim == 3 else cov
    start = torch.distributions.MultivariateNormal(
        ab_T.sqrt() * mean, ab_T * cov + (1 - ab_T) * torch.eye(D, dtype=torch.float64)
    )
    return start.log_prob(x_T)


def nll(
    model,
    scheduler,
    x,
    y=None,
    rtol=1e-5,
    atol=1e-5,
    exact_div=None,
    probes=1,
    batch_size=1000,
    seed=0,
    max_evals=MAX_EVALS,
    progress=None,
):
    """-log p(x) (N,) in nats per point, in data units, of the model's probability-flow ODE (module docstring).

    model(z, t) or model(z, t, y) -> the network's output in model space; x (N, D) points in data units; y: (N,)
    class labels, (N, C) numbers, or None. exact_div=None: exact divergence when D <= 8, else Hutchinson with
    `probes` draws from `seed`. A batch that needs more than max_evals network evaluations (a stiff flow: a model
    far from trained, or diverging) stops with a ValueError naming its points. progress(done, total): called as the
    solve goes, done and total in points, fractions of a batch included.
    """
    x, D = points(x)
    exact_div = D <= EXACT_DIV_MAX_D if exact_div is None else exact_div
    net = tinydiff.unwrap(model)
    shift, scale = data_map(model, D)
    ab_T = scheduler.alphas_cumprod[-1].detach().cpu().double()

    generator = torch.Generator().manual_seed(seed)
    f = ProbabilityFlow(model, scheduler, D, exact_div)
    s_span = (f.log_sigma[0], f.log_sigma[-1])
    out = []
    f.max_evals = max_evals
    for i, (xb, yb) in enumerate(batches(x, y, batch_size)):
        n, f.evals = len(xb), 0
        if progress is not None:  # the share of this batch's span of log sigma_bar already integrated
            f.progress = lambda s, i=i, n=n: progress(
                i * batch_size + n * (s - s_span[0]) / (s_span[1] - s_span[0]), len(x)
            )
        f.y = None if yb is None else torch.as_tensor(yb, device=f.device)
        f.noise = [
            (torch.randint(0, 2, (n, D), generator=generator) * 2 - 1).float().to(f.device) for _ in range(probes)
        ]
        z = (xb - shift) / scale
        try:
            sol = solve_ivp(
                f, s_span, np.concatenate([z.numpy().ravel(), np.zeros(n)]), method="RK45", rtol=rtol, atol=atol
            )
        except OverBudget:
            first = i * batch_size
            raise StiffFlow(
                f"the probability-flow ODE took more than {max_evals:,} network evaluations for points {first}.."
                f"{first + n - 1} without finishing (a trained model needs a few hundred): the model's flow is stiff "
                "there, as an untrained or diverging model's is; score it after more training, or fewer points"
            ) from None
        if not sol.success:
            raise RuntimeError(f"the probability-flow ODE solver failed ({sol.message}); try a looser rtol/atol")
        end = torch.from_numpy(sol.y[:, -1])
        x_bar_T, delta = end[: n * D].view(n, D), end[n * D :]
        log_p = (
            start_log_prob(net, yb, ab_T.sqrt() * x_bar_T, ab_T)
            + D / 2 * torch.log(ab_T)
            + delta
            - torch.log(scale).sum()
        )
        out.append(-log_p.numpy())
    return np.concatenate(out) if out else np.zeros(0)


def flow(model, scheduler, x, y=None, reverse=False, rtol=1e-5, atol=1e-5, batch_size=1000):
    """Solve the probability-flow ODE without the divergence. reverse=False: data points x (N, D), in data
    units, to x_T = sqrt(ab_T) x_bar_T in model space (where the sampler's prior lives); reverse=True: x_T
    back to data units (deterministic sampling with an adaptive solver)."""
    x, D = points(x)
    shift, scale = data_map(model, D)
    sqrt_ab_T = scheduler.alphas_cumprod[-1].detach().cpu().double().sqrt()
    f = ProbabilityFlow(model, scheduler, D)
    s_span = (f.log_sigma[-1], f.log_sigma[0]) if reverse else (f.log_sigma[0], f.log_sigma[-1])
    out = []
    for xb, yb in batches(x, y, batch_size):
        f.y = None if yb is None else torch.as_tensor(yb, device=f.device)
        start = xb / sqrt_ab_T if reverse else (xb - shift) / scale
        sol = solve_ivp(f.velocity, s_span, start.numpy().ravel(), method="RK45", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"the probability-flow ODE solver failed ({sol.message}); try a looser rtol/atol")
        end = torch.from_numpy(sol.y[:, -1]).view(len(xb), D)
        out.append((shift + scale * end if reverse else sqrt_ab_T * end).numpy())
    return np.concatenate(out) if out else np.zeros((0, D))


def summarize(nll_nats, D):
    """dict(nll_bits, nll_bits_se, nll_bits_per_dim): the mean NLL in bits per point, its standard error, per
    coordinate."""
    bits = np.asarray(nll_nats, dtype=np.float64) / math.log(2)
    se = bits.std() / math.sqrt(len(bits)) if len(bits) > 1 else float("nan")
    return dict(nll_bits=float(bits.mean()), nll_bits_se=float(se), nll_bits_per_dim=float(bits.mean() / D))
