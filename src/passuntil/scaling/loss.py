"""The loss scaling law (Kaplan et al.): L(N) = (c / N)^alpha + L0.

Fitted by least squares on log L over a grid of starting points (three parameters, a handful
of sizes: local minima are common). Returns a result record with standard errors from the
Jacobian, residuals and `predict(N)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize


@dataclass(frozen=True)
class LossFit:
    c: float
    alpha: float
    l0: float
    stderr: dict
    n: tuple[float, ...]
    loss: tuple[float, ...]
    residuals: tuple[float, ...]  # observed - fitted

    def predict(self, n_params) -> np.ndarray:
        return loss_law(np.asarray(n_params, dtype=float), self.c, self.alpha, self.l0)

    @property
    def rmse(self) -> float:
        return float(np.sqrt(np.mean(np.square(self.residuals))))

    def to_dict(self) -> dict:
        return {"c": self.c, "alpha": self.alpha, "l0": self.l0, "stderr": self.stderr,
                "n": list(self.n), "loss": list(self.loss), "residuals": list(self.residuals),
                "rmse": self.rmse}


def loss_law(n, c, alpha, l0):
    return (c / n) ** alpha + l0


def fit_loss_law(n_params, losses) -> LossFit:
    """Fit L(N) = (c/N)^alpha + L0 with L0 in [0, min L)."""
    n = np.asarray(n_params, dtype=float)
    y = np.asarray(losses, dtype=float)
    if n.size < 3 or n.size != y.size:
        raise ValueError("the loss law needs at least 3 (N, loss) points")
    if np.any(n <= 0) or np.any(y <= 0):
        raise ValueError("N and losses must be positive")

    def resid(theta):
        log_c, alpha, l0 = theta
        return np.log(loss_law(n, np.exp(log_c), alpha, l0)) - np.log(y)

    best = None
    for alpha0 in (0.05, 0.1, 0.2, 0.4, 0.8):
        for frac in (0.0, 0.5, 0.9):
            l0 = frac * y.min()
            # choose c so the law passes through the smallest model's loss
            log_c = np.log(n.min()) + np.log(max(y.max() - l0, 1e-6)) / alpha0
            try:
                r = optimize.least_squares(resid, [log_c, alpha0, l0],
                                           bounds=([-50, 1e-4, 0], [100, 5, y.min() * 0.999]))
            except ValueError:
                continue
            if best is None or r.cost < best.cost:
                best = r
    log_c, alpha, l0 = best.x
    dof = max(1, n.size - 3)
    s2 = 2 * best.cost / dof
    try:
        cov = np.linalg.inv(best.jac.T @ best.jac) * s2
        se = np.sqrt(np.clip(np.diag(cov), 0, None))
    except np.linalg.LinAlgError:
        se = np.full(3, np.nan)
    fitted = loss_law(n, np.exp(log_c), alpha, l0)
    return LossFit(float(np.exp(log_c)), float(alpha), float(l0),
                   {"log_c": float(se[0]), "alpha": float(se[1]), "l0": float(se[2])},
                   tuple(n.tolist()), tuple(y.tolist()), tuple((y - fitted).tolist()))
