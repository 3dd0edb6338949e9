"""Scaling-law fits: the loss law, and the task law at dataset, instance and likelihood level."""

from passuntil.scaling.data import SeriesCounts
from passuntil.scaling.loss import LossFit, fit_loss_law
from passuntil.scaling.task_law import (
           Forecast,
           TaskFit,
           fit_dataset,
           fit_instances_ls,
           fit_likelihood,
)

__all__ = ["Forecast", "LossFit", "SeriesCounts", "TaskFit", "fit_dataset", "fit_instances_ls",
           "fit_likelihood", "fit_loss_law"]
