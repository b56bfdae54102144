"""The exception types the plugin raises for bad input, and the helpers that keep their messages to one line."""


class RecboleLLMError(ValueError):
    """A problem with the user's input: the message names it and says how to fix it, in one line.

    It subclasses ``ValueError`` so that code written against RecBole's own errors keeps catching it.
    The command line prints it without a traceback and exits with status 2.
    """


class ConfigError(RecboleLLMError):
    """A config value (YAML, config_dict or --key=value) that is not valid: the key, its rule and an example."""


class DataError(RecboleLLMError):
    """Atomic files or a dataset that cannot be read as RecBole reads them, or that changed since training."""


class CheckpointError(RecboleLLMError):
    """A checkpoint that is missing, unsafe, corrupt, or of another model, dataset or format."""


class ArtifactError(RecboleLLMError):
    """An artifact that does not keep the contract: unreadable, inconsistent, or of another format."""


class InputError(RecboleLLMError):
    """Input to a served model (histories, k, items to add) that it cannot answer as asked: HTTP 422."""


class ItemExistsError(InputError):
    """An item to add whose token the catalogue already holds: HTTP 409."""


# ---------------------------------------------------------------------------------------------------------
# one-line messages


def shown(text: str, limit: int = 60) -> str:
    """``text`` for an error message: one line, encodable (control characters and lone surrogates escaped),
    at most ``limit`` characters and a count."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return shown(lines[0] if lines else type(error).__name__, 300)
