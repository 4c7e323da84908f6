"""Prompts for zero-shot classification: CLIP's templates and class names and the CuPL descriptions
(from clip-benchmark's files), per-class prompt lists, and the prompt sets of the built-in sets."""

from __future__ import annotations

import json
from collections.abc import Sequence

from ..assets import clip_benchmark_file
from ..errors import InputError

# Fashion-MNIST has no CLIP template set; these are CLIP ImageNet templates that fit small grey
# product photos, plus the short caption the fashion_mnist training source uses.
FASHION_TEMPLATES = ("a photo of a {c}", "a photo of a {c}.", "a photo of the {c}.",
                     "a black and white photo of a {c}.", "a low resolution photo of a {c}.",
                     "a blurry photo of a {c}.", "a photo of a small {c}.")
PROMPT_CHOICES = ("both", "templates", "cupl")


def load_templates(dataset: str = "imagenet1k") -> list[str]:
    """CLIP's prompt templates for ``dataset`` from clip-benchmark ({c} stands for the class name)."""
    data = json.loads(clip_benchmark_file("en_zeroshot_classification_templates.json").read_text(encoding="utf-8"))
    if dataset not in data:
        raise InputError(f"no templates for {dataset!r}; known: {', '.join(sorted(data))}")
    return list(data[dataset])


def load_classnames(dataset: str = "imagenet1k") -> list[str]:
    data = json.loads(clip_benchmark_file("en_classnames.json").read_text(encoding="utf-8"))
    if dataset not in data:
        raise InputError(f"no class names for {dataset!r}; known: {', '.join(sorted(data))}")
    return list(data[dataset])


def load_cupl(dataset: str = "imagenet1k") -> dict[str, list[str]]:
    """CuPL descriptions: class name -> sentences."""
    data = json.loads(clip_benchmark_file("cupl_prompts.json").read_text(encoding="utf-8"))
    if dataset not in data:
        raise InputError(f"no CuPL prompts for {dataset!r}; known: {', '.join(sorted(data))}")
    return data[dataset]


def class_prompts(classnames: Sequence[str], prompts) -> list[list[str]]:
    """Per class, its texts. ``prompts``: a list of templates with ``{c}``, or a dict class -> texts."""
    if isinstance(prompts, dict):
        missing = [c for c in classnames if not prompts.get(c)]
        if missing:
            raise InputError(f"no prompts for {len(missing)} class(es): {', '.join(missing[:10])}")
        return [list(prompts[c]) for c in classnames]
    if isinstance(prompts, str) or not prompts:
        raise InputError("prompts must be a non-empty list of templates or a dict class -> texts")
    bad = [t for t in prompts if "{c}" not in t]
    if bad:
        raise InputError(f"template without '{{c}}': {bad[0]!r}")
    return [[t.replace("{c}", c) for t in prompts] for c in classnames]


def resolve_prompts(prompts, dataset: str = "imagenet1k"):
    """'templates' (CLIP's), 'cupl' (CuPL descriptions), or an explicit list / dict; plus a label."""
    if isinstance(prompts, str):
        if prompts == "templates":
            return load_templates(dataset), f"clip_benchmark templates ({dataset})"
        if prompts == "cupl":
            return load_cupl(dataset), f"CuPL prompts ({dataset})"
        raise InputError(f"prompts must be 'templates', 'cupl', a list of templates or a dict; got {prompts!r}")
    return prompts, "given"


def descriptions_or_templates(classnames: Sequence[str], descriptions: dict, templates: Sequence[str]
                              ) -> tuple[dict[str, list[str]], list[str]]:
    """Per class its descriptions, or its templated names where it has none; and the classes that
    fell back to templates (CuPL has no text for some classes)."""
    out, fallback = {}, []
    for c in classnames:
        texts = [t for t in descriptions.get(c, []) if t.strip()]
        if not texts:
            fallback.append(c)
            texts = [t.replace("{c}", c) for t in templates]
        out[c] = texts
    return out, fallback


def fashion_prompt_sets(prompts: str = "both", per_class: int = 50, seed: int = 0) -> tuple[dict, dict]:
    """Prompt sets for the 10 classes (label -> prompts) and what they are made of.

    'templates': FASHION_TEMPLATES; 'cupl': up to ``per_class`` CuPL descriptions of the matching
    ImageNet classes (data.fashion_mnist.CUPL_CLASSES), templates for a class with none (shirt);
    'both': templates first (the table's column), then CuPL."""
    import random

    from ..data import fashion_mnist as fm

    if prompts not in PROMPT_CHOICES:
        raise InputError(f"fashion-mnist: prompts must be one of {', '.join(PROMPT_CHOICES)}, got {prompts!r}")
    sets, info = {}, {}
    if prompts in ("templates", "both"):
        sets["templates"] = list(FASHION_TEMPLATES)
        info["templates"] = {"count": len(FASHION_TEMPLATES)}
    if prompts in ("cupl", "both"):
        from ..data.captions import cupl_descriptions

        cupl = cupl_descriptions()
        desc = {}
        for c, names in fm.CUPL_CLASSES.items():
            sents = list(dict.fromkeys(s.strip() for n in names for s in cupl.get(n, []) if s.strip()))
            random.Random(seed).shuffle(sents)
            desc[c] = sents[:per_class]
        sets["cupl"], fallback = descriptions_or_templates(fm.CLASSES, desc, FASHION_TEMPLATES)
        info["cupl"] = {"per_class": per_class, "seed": seed, "cupl_classes": fm.CUPL_CLASSES,
                        "template_fallback": fallback}
    return sets, info


def classification_prompts(bench, prompts: str | None):
    """Prompt sets for a file-based classification benchmark (ImageNet): CLIP's templates by default."""
    from dataclasses import replace

    if bench.prompts or prompts in (None, "templates"):
        return bench
    if prompts not in ("cupl", "both"):
        raise InputError(f"zero-shot prompts must be templates, cupl or both, got {prompts!r}")
    templates = load_templates()
    # CuPL covers 998 of the 1,000 ImageNet classes: the others get CLIP's templates
    cupl = descriptions_or_templates(bench.classnames, load_cupl(), templates)[0]
    sets = {"cupl": cupl} if prompts == "cupl" else {"templates": templates, "cupl": cupl}
    return replace(bench, prompts=sets)
