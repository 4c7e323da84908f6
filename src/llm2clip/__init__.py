"""llm2clip: LLM2CLIP (arXiv 2411.04997), a decoder LLM made into CLIP's text teacher."""

__version__ = "0.1.0"
