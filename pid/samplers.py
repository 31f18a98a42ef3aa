"""EDM's samplers (Karras et al. 2022, Alg. 2 and the ablation sampler of Table 1), reproducing generate.py.

Samplers are pure functions of a denoiser `net(x, sigma, class_labels) -> D` that exposes `sigma_min`,
`sigma_max` and optionally `round_sigma`. The state is float64 throughout; `randn_like` is called once per step
(even when the churn is zero) so that per-seed generators stay in EDM's draw order (edm.md §6.1-6.2).
"""

import math
from typing import Callable, Optional

import numpy as np
import torch

__all__ = ["karras_sigmas", "edm_sampler", "ablation_sampler", "round_sigma", "mm_sigma", "ve_posterior",
           "ancestral_sampler"]


def round_sigma(net, sigma) -> torch.Tensor:
    """`net.round_sigma(sigma)` when the net rounds noise levels (iDDPM), else `sigma` as a tensor."""
    fn = getattr(net, "round_sigma", None)
    return fn(sigma) if fn is not None else torch.as_tensor(sigma)


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  device=None) -> torch.Tensor:
    """EDM's ρ-spaced noise levels σ_0 = σ_max > ... > σ_{N-1} = σ_min, float64 [num_steps] (EDM eq. 5).

    One step gives `[σ_max]` (EDM's formula divides by N-1 and would give NaN).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    idx = torch.arange(num_steps, dtype=torch.float64, device=device)
    ramp = idx / (num_steps - 1) if num_steps > 1 else idx
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def edm_sampler(net, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                randn_like: Callable = torch.randn_like, num_steps: int = 18, sigma_min: float = 0.002,
                sigma_max: float = 80, rho: float = 7, S_churn: float = 0, S_min: float = 0,
                S_max: float = float("inf"), S_noise: float = 1) -> torch.Tensor:
    """EDM's Heun sampler, deterministic (S_churn=0) or stochastic; NFE = 2*num_steps - 1.

    latents: unit-normal [N,C,H,W] (scaled by σ_max here); class_labels: one-hot [N,label_dim] or None.
    Returns float64 images [N,C,H,W], nominally in [-1, 1].
    """
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    t_steps = karras_sigmas(num_steps, sigma_min, sigma_max, rho, device=latents.device)
    t_steps = torch.cat([round_sigma(net, t_steps), torch.zeros_like(t_steps[:1])])
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = round_sigma(net, t_cur + gamma * t_cur)
        # Always draw the churn noise, even when it is multiplied by zero: keeps per-seed streams aligned.
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        d_cur = (x_hat - net(x_hat, t_hat, class_labels).to(torch.float64)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:  # Heun correction; the last step to σ=0 stays Euler
            d_prime = (x_next - net(x_next, t_next, class_labels).to(torch.float64)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def _vp_sigma(beta_d: float, beta_min: float, t):
    """VP noise level σ(t) = sqrt(exp(½β_d t² + β_min t) − 1) (EDM Table 1)."""
    return (np.e ** (0.5 * beta_d * (t ** 2) + beta_min * t) - 1) ** 0.5


def _schedule(name: str, beta_d: float, beta_min: float):
    """(σ(t), σ'(t), σ⁻¹(σ)) for the 'vp', 've' or 'linear' schedule."""
    if name == "vp":
        sigma = lambda t: _vp_sigma(beta_d, beta_min, t)
        deriv = lambda t: 0.5 * (beta_min + beta_d * t) * (sigma(t) + 1 / sigma(t))
        inv = lambda s: ((beta_min ** 2 + 2 * beta_d * (s ** 2 + 1).log()).sqrt() - beta_min) / beta_d
        return sigma, deriv, inv
    if name == "ve":
        return (lambda t: t.sqrt()), (lambda t: 0.5 / t.sqrt()), (lambda s: s ** 2)
    if name == "linear":
        return (lambda t: t), (lambda t: 1), (lambda s: s)
    raise ValueError(f"unknown schedule '{name}' (vp, ve or linear)")


def _scaling(name: str, sigma, sigma_deriv):
    """(s(t), s'(t)) for the 'vp' or 'none' scaling."""
    if name == "vp":
        s = lambda t: 1 / (1 + sigma(t) ** 2).sqrt()
        return s, (lambda t: -sigma(t) * sigma_deriv(t) * (s(t) ** 3))
    if name == "none":
        return (lambda t: 1), (lambda t: 0)
    raise ValueError(f"unknown scaling '{name}' (vp or none)")


def _iddpm_sigmas(sigma_min: float, sigma_max: float, C_1: float, C_2: float, M: int, device) -> torch.Tensor:
    """iDDPM's M+1 noise levels (float64 storage; ᾱ in float32 as EDM computes it) within [σ_min, σ_max]."""
    u = torch.zeros(M + 1, dtype=torch.float64, device=device)
    alpha_bar = lambda j: (0.5 * np.pi * j / M / (C_2 + 1)).sin() ** 2
    for j in torch.arange(M, 0, -1, device=device):  # int tensor j -> ᾱ in float32, as in EDM
        u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar(j - 1) / alpha_bar(j)).clip(min=C_1) - 1).sqrt()
    return u[torch.logical_and(u >= sigma_min, u <= sigma_max)]


_DEFAULT_RANGE = {"vp": (None, None), "ve": (0.02, 100.0), "iddpm": (0.002, 81.0), "edm": (0.002, 80.0)}


def _discretization(name, num_steps, sigma_min, sigma_max, rho, epsilon_s, vp_params, C_1, C_2, M, device):
    """The N noise levels σ_i of the 'vp', 've', 'iddpm' or 'edm' discretization, float64."""
    idx = torch.arange(num_steps, dtype=torch.float64, device=device)
    frac = idx / max(num_steps - 1, 1)
    if name == "vp":
        return _vp_sigma(*vp_params, 1 + frac * (epsilon_s - 1))
    if name == "ve":
        return (sigma_max ** 2 * ((sigma_min ** 2 / sigma_max ** 2) ** frac)).sqrt()
    if name == "iddpm":
        u = _iddpm_sigmas(sigma_min, sigma_max, C_1, C_2, M, device)
        return u[((len(u) - 1) / max(num_steps - 1, 1) * idx).round().to(torch.int64)]
    if name == "edm":
        return karras_sigmas(num_steps, sigma_min, sigma_max, rho, device=device)
    raise ValueError(f"unknown discretization '{name}' (vp, ve, iddpm or edm)")


def ablation_sampler(net, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                     randn_like: Callable = torch.randn_like, num_steps: int = 18,
                     sigma_min: Optional[float] = None, sigma_max: Optional[float] = None, rho: float = 7,
                     solver: str = "heun", discretization: str = "edm", schedule: str = "linear",
                     scaling: str = "none", epsilon_s: float = 1e-3, C_1: float = 0.001, C_2: float = 0.008,
                     M: int = 1000, alpha: float = 1, S_churn: float = 0, S_min: float = 0,
                     S_max: float = float("inf"), S_noise: float = 1) -> torch.Tensor:
    """EDM's generalized sampler (Table 1 ablations): solver euler|heun, discretization vp|ve|iddpm|edm,
    schedule vp|ve|linear, scaling vp|none. latents unit-normal [N,C,H,W]; returns float64 [N,C,H,W]."""
    if solver not in ("euler", "heun"):
        raise ValueError(f"unknown solver '{solver}' (euler or heun)")
    if discretization not in _DEFAULT_RANGE:
        raise ValueError(f"unknown discretization '{discretization}' (vp, ve, iddpm or edm)")
    vp_default = (_vp_sigma(19.9, 0.1, epsilon_s), _vp_sigma(19.9, 0.1, 1.0))
    lo, hi = vp_default if discretization == "vp" else _DEFAULT_RANGE[discretization]
    sigma_min = max(lo if sigma_min is None else sigma_min, net.sigma_min)
    sigma_max = min(hi if sigma_max is None else sigma_max, net.sigma_max)
    # VP parameters refitted so that σ(ε_s) = σ_min and σ(1) = σ_max.
    vp_beta_d = 2 * (np.log(sigma_min ** 2 + 1) / epsilon_s - np.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    vp_beta_min = np.log(sigma_max ** 2 + 1) - 0.5 * vp_beta_d
    sigma, sigma_deriv, sigma_inv = _schedule(schedule, vp_beta_d, vp_beta_min)
    s, s_deriv = _scaling(scaling, sigma, sigma_deriv)
    sigma_steps = _discretization(discretization, num_steps, sigma_min, sigma_max, rho, epsilon_s,
                                  (vp_beta_d, vp_beta_min), C_1, C_2, M, latents.device)
    t_steps = sigma_inv(round_sigma(net, sigma_steps))
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])

    def slope(x, t):  # dx/dt of the scaled probability-flow ODE at (x, t)
        denoised = net(x / s(t), sigma(t), class_labels).to(torch.float64)
        return (sigma_deriv(t) / sigma(t) + s_deriv(t) / s(t)) * x - sigma_deriv(t) * s(t) / sigma(t) * denoised

    x_next = latents.to(torch.float64) * (sigma(t_steps[0]) * s(t_steps[0]))
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= sigma(t_cur) <= S_max else 0
        t_hat = sigma_inv(round_sigma(net, sigma(t_cur) + gamma * sigma(t_cur)))
        noise_std = (sigma(t_hat) ** 2 - sigma(t_cur) ** 2).clip(min=0).sqrt()
        x_hat = s(t_hat) / s(t_cur) * x_cur + noise_std * s(t_hat) * S_noise * randn_like(x_cur)
        h = t_next - t_hat
        d_cur = slope(x_hat, t_hat)
        if solver == "euler" or i == num_steps - 1:
            x_next = x_hat + h * d_cur
        else:
            d_prime = slope(x_hat + alpha * h * d_cur, t_hat + alpha * h)
            x_next = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)
    return x_next


# ------------------------------------------------------------------------------ moment matching's Algorithm 1
def mm_sigma(t, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """σ(t) for moment matching's time t ∈ [0, 1]: Karras interpolation, σ(0) = σ_min, σ(1) = σ_max (float64).

    A uniform t-grid is EDM's ρ-spaced grid (docs/moment_matching.md §(a)); ρ → ∞ approaches uniform log σ.
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + t * (hi - lo)) ** rho


def ve_posterior(z_t: torch.Tensor, x: torch.Tensor, sigma_t, sigma_s) -> tuple:
    """Mean and std of q(z_s | z_t, x) for the variance-exploding process z_σ = x + σ·ε, σ_s < σ_t.

    r = σ_s²/σ_t²; mean = r·z_t + (1 − r)·x; var = σ_s²·(σ_t² − σ_s²)/σ_t² (paper §2 with α ≡ 1). Computed in
    float64 (the ratio of two squared noise levels loses digits in float32 near σ_s ≈ σ_t). sigma_t, sigma_s:
    scalars or per-sample [B] tensors. Returns (mean float64 [B,C,H,W], std float64 [B,1,1,1] or scalar tensor).
    """
    st = torch.as_tensor(sigma_t, dtype=torch.float64, device=z_t.device)
    ss = torch.as_tensor(sigma_s, dtype=torch.float64, device=z_t.device)
    if st.ndim:
        st, ss = st.reshape(-1, 1, 1, 1), ss.reshape(-1, 1, 1, 1)
    r = ss ** 2 / st ** 2
    mean = r * z_t.to(torch.float64) + (1 - r) * x.to(torch.float64)
    std = (ss ** 2 * (st ** 2 - ss ** 2) / st ** 2).clamp(min=0).sqrt()
    return mean, std


@torch.no_grad()
def ancestral_sampler(net, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                      randn_like: Callable = torch.randn_like, num_steps: int = 4, sigma_min: float = 0.002,
                      sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Moment matching's Algorithm 1: k = num_steps denoiser calls on the grid t = 1, (k−1)/k, …, 1/k.

    z = σ(1)·latents; at each t: x̃ = net(z, σ(t)), then z ~ q(z_s | z, x̃) with s = t − 1/k (float64, one
    `randn_like` per step except the last); the last call's x̃ is returned. Works for any denoiser
    `net(x, sigma, class_labels)` (an EDM teacher, a built-in teacher, an MM generator). σ_min/σ_max are clipped
    to the net's range as in `edm_sampler`. latents: unit-normal [N,C,H,W]; returns float64 [N,C,H,W].
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    sigma_min = max(sigma_min, getattr(net, "sigma_min", sigma_min))
    sigma_max = min(sigma_max, getattr(net, "sigma_max", sigma_max))
    t = torch.arange(num_steps, 0, -1, dtype=torch.float64) / num_steps
    sigmas = round_sigma(net, mm_sigma(t, sigma_min, sigma_max, rho).to(latents.device))
    z = latents.to(torch.float64) * sigmas[0]
    x = z
    for i, sigma in enumerate(sigmas):
        x = net(z.to(latents.dtype), sigma, class_labels).to(torch.float64)
        if i + 1 < num_steps:
            mean, std = ve_posterior(z, x, sigma, sigmas[i + 1])
            z = mean + std * randn_like(z)
    return x
