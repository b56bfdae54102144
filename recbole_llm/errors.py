"""The one exception type the plugin raises for bad input."""


class RecboleLLMError(ValueError):
    """A problem with the user's input: the message names it and says how to fix it, in one line.

    It subclasses ``ValueError`` so that code written against RecBole's own errors keeps catching it.
    The command line prints it without a traceback and exits with status 2.
    """
