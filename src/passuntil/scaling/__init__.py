"""Scaling-law fits: the loss law now; task-law fits and forecasts follow (see issues)."""

from passuntil.scaling.loss import LossFit, fit_loss_law

__all__ = ["LossFit", "fit_loss_law"]
