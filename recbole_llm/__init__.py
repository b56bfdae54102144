"""recbole_llm: pretrained BERT encoders, fully or parameter-efficiently fine-tuned, as RecBole models.

``import recbole_llm`` is all a RecBole user needs: it makes RecBole 1.2.1 work on today's stack
(:mod:`recbole_llm.patches.stack`) and registers the plugin's models with RecBole's own entry points
(:mod:`recbole_llm.patches.models`), so ``run_recbole(model='BERTRec', dataset='ml-100k')`` just works. Every
change to RecBole is one entry of :mod:`recbole_llm.patches`, installed once.

It does so when RecBole is imported, not before: importing ``recbole_llm`` (or its serving modules,
:mod:`recbole_llm.serving.runtime` and :mod:`recbole_llm.serving.http`) imports neither RecBole nor torch. If RecBole is
already imported, the plugin is installed at once; otherwise the first ``import recbole...`` installs it,
right after RecBole's own package ``__init__`` ran and before the import that asked for it returns.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading
from typing import Any

from recbole_llm.patches.stack import silence_stack_noise as _silence_stack_noise
from recbole_llm.errors import RecboleLLMError
from recbole_llm.version import __version__


# Before RecBole is imported: its import prints deprecation warnings from ray and pkg_resources.
_silence_stack_noise()

_installed = False
_lock = threading.RLock()


def _install() -> None:
    """Make RecBole work on today's stack and register the plugin. Idempotent."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
        from recbole_llm import patches

        patches.install()


class _InstallAfterRecBole(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``recbole`` with the other finders, runs its ``__init__``, then installs the plugin."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname != "recbole" or "recbole" in sys.modules:
            return None
        # Asked by an import or by a mere importlib.util.find_spec: stay in place until RecBole executes.
        index = sys.meta_path.index(self)
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec("recbole")
        finally:
            sys.meta_path.insert(index, self)
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def __getattr__(self, name: str) -> Any:  # resource readers, get_source ...: RecBole's own loader
        loader = self.__dict__.get("_loader")
        if loader is None:
            raise AttributeError(name)
        return getattr(loader, name)

    def exec_module(self, module) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # RecBole is being imported: its job is done after this
        self._loader.exec_module(module)
        _install()


if "recbole" in sys.modules:
    _install()
elif importlib.util.find_spec("recbole") is not None:
    sys.meta_path.insert(0, _InstallAfterRecBole())


# The public API: name -> module that defines it. Loaded on first use, so that ``import recbole_llm`` stays
# light and a serving install (no torch, no RecBole) can use Recommender. A test pins this list.
_PUBLIC = {
    "Recommender": "recbole_llm.serving.runtime",
    "Recommendation": "recbole_llm.serving.records",
    "ExportOptions": "recbole_llm.export.options",
    "export_checkpoint": "recbole_llm.export.pipeline",
    "load_checkpoint": "recbole_llm.checkpoint.loading",  # imports RecBole, which installs the plugin first
    "available_models": "recbole_llm.model.catalog",
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'recbole_llm' has no attribute '{name}'")


__all__ = ["RecboleLLMError", *_PUBLIC, "__version__"]
