"""Sampler backends: one protocol (`base.Sampler`), several implementations."""

from passuntil.backends.base import Completion, Sampler, SamplingParams, TokenScores

__all__ = ["Completion", "Sampler", "SamplingParams", "TokenScores"]
