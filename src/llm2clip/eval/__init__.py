"""Evaluation: caption retrieval accuracy (CRA), image-text retrieval, zero-shot classification,
benchmark loaders (files and built-in sets), checkpoint evaluation and reports.

Layout: ``benchmark`` (the loaded benchmark type), ``encoding`` (images and texts through a model),
``loaders/`` (one module per format family), ``prompts`` (zero-shot prompt sets), ``registry`` (every
loader, imported by name); ``retrieval``, ``zeroshot``, ``cra`` score; ``checkpoint`` loads a model and
runs the benchmarks; ``report`` writes results. ``benchmarks`` re-exports the names of the old layout.

Names load on first use, so building the command line does not import torch for this package."""

_EXPORTS = {
    "benchmark": ["Benchmark", "BenchmarkSpec", "BenchmarkUnavailable"],
    "registry": ["REGISTRY", "describe_benchmarks", "load_benchmark", "register"],
    "encoding": ["encode_benchmark_images", "encode_texts"],
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
