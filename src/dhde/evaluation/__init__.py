"""Benchmarking defocus maps: datasets, metrics, methods, runs and plots.

``dhde evaluate`` is a thin layer over :func:`dhde.evaluation.runner.evaluate`;
the protocols are documented in ``docs/evaluation.md``.

>>> from dhde.evaluation import open_dataset, parse_methods, evaluate   # doctest: +SKIP
>>> result = evaluate(open_dataset("cuhk_dev"), parse_methods(["dhde", "hifst"]), "eval-out")  # doctest: +SKIP
>>> result.summaries["dhde"].values["ap_pooled"]                        # doctest: +SKIP
"""

from .datasets import Dataset, DatasetError, Sample, load_mask, load_sigma, open_dataset
from .methods import MethodError, MethodSpec, parse_method, parse_methods
from .runner import EvaluationResult, evaluate
from .scoring import ImageScores, Summary, score_image, summarise
from .synthetic import SyntheticParameters, make_synthetic_benchmark

__all__ = [
    "Dataset",
    "DatasetError",
    "EvaluationResult",
    "ImageScores",
    "MethodError",
    "MethodSpec",
    "Sample",
    "Summary",
    "SyntheticParameters",
    "evaluate",
    "load_mask",
    "load_sigma",
    "make_synthetic_benchmark",
    "open_dataset",
    "parse_method",
    "parse_methods",
    "score_image",
    "summarise",
]
