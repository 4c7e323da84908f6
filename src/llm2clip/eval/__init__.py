"""Evaluation: caption retrieval accuracy (CRA), image-text retrieval, zero-shot classification,
benchmark loaders and reports."""

from .benchmarks import REGISTRY, Benchmark, describe_benchmarks, load_benchmark
from .cra import caption_retrieval_accuracy
from .report import make_run, model_identity, write_report
from .retrieval import evaluate_retrieval, retrieval_metrics, retrieval_ranks, retrieval_result
from .zeroshot import build_classifier, evaluate_zeroshot, zeroshot_accuracy

__all__ = ["REGISTRY", "Benchmark", "describe_benchmarks", "load_benchmark", "caption_retrieval_accuracy",
           "make_run", "model_identity", "write_report", "evaluate_retrieval", "retrieval_metrics",
           "retrieval_ranks", "retrieval_result", "build_classifier", "evaluate_zeroshot", "zeroshot_accuracy"]
