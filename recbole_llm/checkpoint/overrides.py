"""What this run sets on a loaded checkpoint's Config: the user's overrides (``--key=value``), this
machine's device and this process's settings.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Iterator

from recbole_llm.errors import CheckpointError, shown


_OVERRIDES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("recbole_llm_overrides", default=None)


@contextlib.contextmanager
def config_overrides(overrides: dict | None) -> Iterator[None]:
    """While active, every checkpoint's Config loaded gets ``overrides`` (``recbole-llm evaluate/export
    --data_path=... --key=value``): a checkpoint evaluated or exported from another folder or machine."""
    token = _OVERRIDES.set(dict(overrides) if overrides else None)
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


def apply_overrides(config: Any, overrides: dict | None) -> None:
    """Set ``overrides`` on a loaded Config the way RecBole reads them: command-line strings converted as
    RecBole converts its own command line, ``data_path`` as the folder holding the dataset's folder."""
    from recbole.config.configurator import Config

    if not overrides or not isinstance(config, Config):
        return
    from recbole_llm.config import check_config_values

    values = config._convert_config_dict(dict(overrides))
    recorded_values = dict(config.final_config_dict)
    for key, value in values.items():
        if key not in recorded_values:
            # a misspelt key would be set, never read, and the run go on without it
            raise CheckpointError(f"--{key} is no setting of this checkpoint's Config (a misspelling?): "
                                  "use a key its run had, e.g. --eval_batch_size=N or --data_path=DIR")
        if key in ("model", "dataset", "device"):
            raise CheckpointError(f"--{key} cannot change for a checkpoint: it was trained with "
                                  f"{key}={config[key]!r}")
        if key == "data_path":
            value = os.path.join(os.fspath(value), config["dataset"])
        recorded = config.final_config_dict.get(key)
        if key == "text_model_name_or_path" and value is None and isinstance(recorded, str):
            # its item vectors come from that model: an override may say where it is now, not drop it (the
            # checks would then suggest some other model)
            raise CheckpointError(f"the checkpoint's item text was embedded by '{shown(recorded, 120)}', so "
                                  "text_model_name_or_path cannot be null for it: drop the override, or pass "
                                  "--text_model_name_or_path=DIR (a local copy of that model)")
        config.final_config_dict[key] = value
    check_config_values(config.final_config_dict, defaults=recorded_values)


def follow_this_machine(config: Any) -> None:
    """Point a checkpoint's ``Config`` at this machine: a CUDA device becomes the CPU where CUDA is absent.

    RecBole pickles the ``device`` its training machine chose (``Config._init_device``) and
    ``load_data_and_model`` moves the model there; on a CPU-only machine that is torch's "Attempting to
    deserialize object on a CUDA device". Mixed precision is already CUDA-only in the plugin trainer.
    """
    import torch
    from recbole.config.configurator import Config

    if not isinstance(config, Config) or torch.cuda.is_available():
        return
    final = getattr(config, "final_config_dict", None)
    device = final.get("device") if isinstance(final, dict) else None
    if isinstance(device, torch.device) and device.type == "cuda":
        final["device"] = torch.device("cpu")
        final["use_gpu"] = False
        final["gpu_id"] = ""


def follow_this_process(config: Any) -> None:
    """A checkpoint that DDP ranks trained, used outside a process group: one process's settings, so that
    RecBole builds its data with a plain sampler (its ``DistributedSampler`` fails without a process group)."""
    import torch.distributed as dist

    final = getattr(config, "final_config_dict", None)
    if isinstance(final, dict) and final.get("single_spec") is False and not (
            dist.is_available() and dist.is_initialized()):
        final.update(single_spec=True, world_size=1, nproc=1, local_rank=0)
