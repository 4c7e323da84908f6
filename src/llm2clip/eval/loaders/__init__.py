"""Benchmark loaders, one module per family of formats; ``llm2clip.eval.registry`` names them all.

Importing this package registers nothing: the registry imports each loader by name.
"""
