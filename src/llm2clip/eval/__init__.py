"""Evaluation: caption retrieval accuracy (CRA), image-text retrieval, zero-shot classification."""

from .cra import caption_retrieval_accuracy

__all__ = ["caption_retrieval_accuracy"]
