"""Errors the user can act on: each names the file, line or field at fault."""


class Llm2ClipError(Exception):
    """Base class of every error that the command line reports without a traceback."""


class ConfigError(Llm2ClipError):
    pass


class InputError(Llm2ClipError):
    pass
