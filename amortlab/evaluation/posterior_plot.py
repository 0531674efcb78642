"""Posterior pictures for models with a 2-D latent (Cremer et al. 2018, Fig. 2): for a few datapoints (rows), contours
of the true posterior p(z | x) from a grid, next to the approximations (columns: the amortized q, q*_FFG, q*_Flow, ...).

Grid convention: one ``axis`` ``[n]`` (``linspace(-extent, extent, n)``, spacing h) for both latent dimensions; a grid
tensor ``[P, n, n]`` holds at ``[p, i, j]`` the value at z = (axis[i], axis[j]) for point p (first index z_1).
Densities on the grid are normalised by the Riemann sum: ``sum(density) * h^2 = 1`` for the true posterior.

Three ways to get a panel ``[P, n, n]``:
- ``posterior_grid``: the true posterior from the model's log p(x, z) (normalised on the grid);
- ``grid_log_density``: any closed-form log density, e.g. a Gaussian q's ``log_prob`` (exponentiate for a panel);
- ``density_on_grid``: a smoothed 2-D histogram of samples, for families whose marginal q(z) is intractable (the
  auxiliary flow, whose sampler gives z_T but whose marginal q(z_T) has no closed form).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from amortlab.evaluation.gaps import fit_qstar

DEFAULT_ROWS = 1 << 15  # grid points x datapoints per chunk of log-density evaluations


def grid_axis(extent: float = 4.0, n: int = 200, dtype: torch.dtype = torch.float64,
              device: torch.device | str | None = None) -> Tensor:
    """The grid axis ``[n]``: ``linspace(-extent, extent, n)``."""
    if n < 2 or extent <= 0:
        raise ValueError(f"need n >= 2 and extent > 0, got n={n}, extent={extent}")
    return torch.linspace(-extent, extent, n, dtype=dtype, device=device)


def _grid_points(axis: Tensor) -> Tensor:
    """All grid points ``[n * n, 2]`` in [i, j] order (z_1 = axis[i] varies slowest)."""
    z1, z2 = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([z1, z2], -1).reshape(-1, 2)


@torch.no_grad()
def grid_log_density(log_prob: Callable[[Tensor], Tensor], axis: Tensor, n_points: int,
                     rows: int = DEFAULT_ROWS) -> Tensor:
    """Evaluate ``log_prob(z [k, P, 2]) -> [k, P]`` (e.g. ``DiagGaussian.log_prob``) at every grid point, in chunks
    of about ``rows`` (grid point, datapoint) pairs. Returns ``[P, n, n]`` (``P`` = ``n_points``), unnormalised."""
    n = len(axis)
    pts = _grid_points(axis)
    chunk = max(1, rows // max(1, n_points))
    out = []
    for start in range(0, len(pts), chunk):
        z = pts[start:start + chunk, None, :].expand(-1, n_points, 2)
        out.append(log_prob(z))
    return torch.cat(out, 0).T.reshape(n_points, n, n)


def _cell_area(axis: Tensor) -> float:
    return float(axis[1] - axis[0]) ** 2


@torch.no_grad()
def posterior_grid(log_joint: Callable[[Tensor, Tensor], Tensor], x: Tensor, extent: float = 4.0, n: int = 200,
                   rows: int = DEFAULT_ROWS) -> tuple[Tensor, Tensor]:
    """The true posterior log p(z | x) on an ``n x n`` grid over [-extent, extent]^2.

    ``log_joint(x [P, X], z [k, P, 2]) -> [k, P]`` is log p(x, z) (``model.log_joint``); it is evaluated in chunks
    of about ``rows`` (grid point, datapoint) pairs. Returns (``axis`` ``[n]``, ``log_post`` ``[P, n, n]``) with
    log_post normalised on the grid: ``logsumexp(log_post[p]) + log h^2 = 0``; ``log_post[p]`` differs from the true
    log p(z | x) by log of the fraction of posterior mass inside the square, so the square must hold the posterior.
    Computed in x's floating dtype.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [P, X], got shape {tuple(x.shape)}")
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    axis = grid_axis(extent, n, dtype, x.device)
    lj = grid_log_density(lambda z: log_joint(x, z), axis, len(x), rows)
    log_norm = torch.logsumexp(lj.flatten(1), 1) + math.log(_cell_area(axis))
    return axis, lj - log_norm[:, None, None]


@torch.no_grad()
def density_on_grid(samples: Tensor, axis: Tensor, bandwidth: float = 1.0) -> Tensor:
    """A smoothed 2-D histogram density of ``samples`` ``[S, P, 2]`` on the grid of ``axis`` ``[n]``: ``[P, n, n]``.

    Each sample counts in the cell of its nearest grid point (cells of side h centred on the grid points); counts are
    divided by S h^2 (so a density, integrating to the fraction of samples inside the grid; samples outside are
    dropped) and then smoothed by a Gaussian kernel of ``bandwidth`` grid cells (0: the raw histogram), which adds
    (bandwidth h)^2 + h^2 / 12 to the variance of the picture. Returned in ``axis``'s dtype.
    """
    if samples.dim() != 3 or samples.shape[-1] != 2:
        raise ValueError(f"samples must be [S, P, 2], got shape {tuple(samples.shape)}")
    S, P, _ = samples.shape
    n = len(axis)
    h = float(axis[1] - axis[0])
    idx = torch.round((samples.to(axis.dtype) - axis[0]) / h).long()  # [S, P, 2]
    inside = ((idx >= 0) & (idx < n)).all(-1)  # [S, P]
    point = torch.arange(P, device=samples.device).expand(S, P)
    flat = (point * n * n + idx[..., 0] * n + idx[..., 1])[inside]
    counts = torch.bincount(flat, minlength=P * n * n).to(axis.dtype).reshape(P, n, n)
    dens = counts / (S * h * h)
    if bandwidth > 0:
        r = max(1, math.ceil(4 * bandwidth))
        t = torch.arange(-r, r + 1, dtype=axis.dtype, device=axis.device)
        kernel = torch.exp(-0.5 * (t / bandwidth) ** 2)
        kernel = (kernel / kernel.sum()).view(1, 1, -1)
        # separable: along j (last dim), then along i
        dens = F.conv1d(dens.reshape(P * n, 1, n), kernel, padding=r).reshape(P, n, n)
        dens = F.conv1d(dens.transpose(1, 2).reshape(P * n, 1, n), kernel, padding=r).reshape(P, n, n)
        dens = dens.transpose(1, 2).contiguous()
    return dens


def _row_limits(density: np.ndarray, axis: np.ndarray, frac: float = 1e-3,
                pad: float = 0.3) -> tuple[float, float, float, float]:
    """A square window (z_1 lo, hi, z_2 lo, hi) around where ``density`` ``[n, n]`` exceeds ``frac`` of its
    maximum, padded by ``pad``."""
    mask = density >= frac * density.max()
    i, j = np.nonzero(mask)
    lo1, hi1, lo2, hi2 = axis[i.min()], axis[i.max()], axis[j.min()], axis[j.max()]
    c1, c2 = (lo1 + hi1) / 2, (lo2 + hi2) / 2
    half = max(hi1 - lo1, hi2 - lo2, 4 * (axis[1] - axis[0])) * (1 + pad) / 2
    return c1 - half, c1 + half, c2 - half, c2 + half


def plot_posteriors(path: str | Path, axis: Tensor, true_log_post: Tensor, panels: Mapping[str, Tensor],
                    true_title: str = "true posterior", row_labels: Sequence[str] | None = None,
                    title: str | None = None, levels: Sequence[float] = (0.02, 0.1, 0.3, 0.5, 0.7, 0.9),
                    overlay_true: bool = True, zoom: bool = True, dpi: int = 100) -> Path:
    """Write a PNG of posterior contours: one row per datapoint, columns = the true posterior then ``panels``.

    ``axis`` ``[n]``; ``true_log_post`` ``[P, n, n]`` (log density, e.g. from ``posterior_grid``); ``panels`` maps a
    column title (e.g. ``"amortized q"``, ``"q*_FFG"``, ``"q*_Flow"``) to DENSITIES (not logs) ``[P, n, n]`` on the
    same grid (``grid_log_density(...).exp()`` for closed forms, ``density_on_grid`` for samples). Contours are at
    ``levels`` times each panel's own maximum; with ``overlay_true`` the true posterior is drawn in light grey under
    every approximation. ``zoom`` gives each row a square window around the true posterior (else the whole grid).
    Matplotlib's Agg canvas (no display, no pyplot state). Returns the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ax_np = axis.detach().double().cpu().numpy()
    true = torch.exp(true_log_post.detach().double()).cpu().numpy()  # [P, n, n]
    cols = [(true_title, true)] + [(name, d.detach().double().cpu().numpy()) for name, d in panels.items()]
    P, n = true.shape[0], len(ax_np)
    for name, d in cols:
        if d.shape != (P, n, n):
            raise ValueError(f"panel {name!r} has shape {d.shape}; expected {(P, n, n)} like the true posterior")
    if row_labels is not None and len(row_labels) != P:
        raise ValueError(f"{len(row_labels)} row labels for {P} points")
    fig = Figure(figsize=(2.4 * len(cols), 2.4 * P + (0.4 if title else 0.0)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(P, len(cols), squeeze=False)
    for p in range(P):
        lims = _row_limits(true[p], ax_np) if zoom else (ax_np[0], ax_np[-1], ax_np[0], ax_np[-1])
        for c, (name, d) in enumerate(cols):
            ax = axes[p, c]
            if overlay_true and c > 0:
                ax.contour(ax_np, ax_np, true[p].T, levels=np.asarray(levels[::2]) * true[p].max(), colors="0.8",
                           linewidths=0.8)
            peak = float(d[p].max())
            if np.isfinite(peak) and peak > 0:  # an empty panel (e.g. no samples on the grid) stays blank
                ax.contour(ax_np, ax_np, d[p].T, levels=np.asarray(levels) * peak, cmap="viridis", linewidths=1.0)
            ax.set_xlim(lims[0], lims[1])
            ax.set_ylim(lims[2], lims[3])
            ax.set_aspect("equal")
            ax.tick_params(labelsize=6)
            if p == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(row_labels[p] if row_labels is not None else f"x{p}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def draw_gap_posteriors(model, x: Tensor, cfg, path: str | Path, generator: torch.Generator | None = None,
                        samples: int = 20_000, extent: float = 4.0, n: int = 150) -> Path:
    """Cremer et al.'s figure for a model with a 2-D latent: for the points ``x`` ``[P, X]`` (a few), contours of
    the true posterior (grid), the method's q, q*_FFG and q*_Flow (``cfg``: a ``GapsConfig``; the q* are fitted
    here for these points, as ``evaluation=gaps`` fits them). q* panels (and any q without a closed-form density)
    are smoothed histograms of ``samples`` draws. Returns the PNG path."""
    if model.z_dim != 2:
        raise ValueError(f"posterior pictures need a 2-D latent, the model has z_dim={model.z_dim}")
    with torch.no_grad():
        axis, true_log_post = posterior_grid(model.log_joint, x, extent, n)
        q = model.infer_for_eval(x, generator).q
        if q.capabilities.log_prob:
            panels = {"amortized q": grid_log_density(q.log_prob, axis, len(x)).exp()}
        else:
            panels = {"amortized q": density_on_grid(q.rsample(samples, generator), axis)}
    labels = {"ffg": "q*_FFG", "layered": "q*_Layered", "flow": "q*_Flow"}
    for name, qs in fit_qstar(model, x, q, cfg, generator).items():
        with torch.no_grad():
            panels[labels[name]] = density_on_grid(qs.rsample(samples, generator), axis)
    return plot_posteriors(path, axis, true_log_post, panels, row_labels=[f"x_{i}" for i in range(len(x))],
                           title="true posterior, amortized q and the per-point optima q*")


def draw_posteriors(module, datamodule, cfg, path: Path, logger, seed: int, n_points: int = 4) -> None:
    """Cremer et al.'s posterior figure for a 2-D latent model (first ``n_points`` test points, q* per ``cfg``, a
    ``GapsConfig``): PNG at ``path`` and, where the logger shows images (W&B), an image ``images/posteriors``."""
    x = next(iter(datamodule.eval_dataloader("test", n_points))).x.to(module.device)
    g = torch.Generator(device=x.device).manual_seed(int(seed))
    module.eval()
    draw_gap_posteriors(module, x, cfg, path, g)
    if logger is not None and hasattr(logger, "log_image"):
        logger.log_image(key="images/posteriors", images=[str(path)])
