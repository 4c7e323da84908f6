"""Evaluation: caption retrieval accuracy (CRA), image-text retrieval, zero-shot classification,
benchmark loaders (files and built-in sets), checkpoint evaluation and reports.

Names load on first use, so building the command line does not import torch for this package."""

_EXPORTS = {
    "benchmarks": ["REGISTRY", "Benchmark", "BenchmarkUnavailable", "describe_benchmarks", "load_benchmark"],
    "checkpoint": ["EvalModel", "caption_encoder_for", "evaluate_checkpoint", "load_eval_model"],
    "cra": ["caption_retrieval_accuracy", "evaluate_cra"],
    "report": ["make_run", "model_identity", "write_report"],
    "retrieval": ["evaluate_retrieval", "retrieval_metrics", "retrieval_ranks", "retrieval_result"],
    "zeroshot": ["build_classifier", "evaluate_zeroshot", "zeroshot_accuracy"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'llm2clip.eval' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
