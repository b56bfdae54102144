"""recbole_llm: pretrained BERT encoders, fully or parameter-efficiently fine-tuned, as RecBole models.

``import recbole_llm`` is all a RecBole user needs: it makes RecBole 1.2.1 work on today's stack
(:mod:`recbole_llm.compat`) and registers the plugin's models with RecBole's own entry points
(:mod:`recbole_llm.registry`), so ``run_recbole(model='BERTRec', dataset='ml-100k')`` just works.
"""

from recbole_llm import compat as _compat

__version__ = "0.1.0"

# Before RecBole is imported: its import prints deprecation warnings from ray and pkg_resources.
_compat.silence_stack_noise()

import importlib.util  # noqa: E402

from recbole_llm.errors import RecboleLLMError  # noqa: E402

# A serving-only install (onnxruntime and numpy, no RecBole) can still use recbole_llm.runtime.
if importlib.util.find_spec("recbole") is not None:
    _compat.import_quick_start()  # after the filters above; ray is optional

    from recbole_llm import distributed as _distributed
    from recbole_llm import registry as _registry

    _compat.install()
    _registry.install()
    _distributed.install()

    from recbole_llm.checkpoint import load_checkpoint
    from recbole_llm.registry import available_models

__all__ = ["RecboleLLMError", "available_models", "load_checkpoint", "__version__"]
