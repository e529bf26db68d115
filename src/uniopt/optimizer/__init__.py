"""Wrapping engines: components, adapters, selection and the report."""

from .component import Component, Metric
from .report import CandidateResult, ComponentReport, OptimizationReport
from .universal import UniversalOptimizer

__all__ = [
    "CandidateResult",
    "Component",
    "ComponentReport",
    "Metric",
    "OptimizationReport",
    "UniversalOptimizer",
]
