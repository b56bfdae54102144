"""Patch bodies for RecBole's checkpoint loading (installed by :mod:`recbole_llm.patches`): every load
reads the file once, safely, through :mod:`recbole_llm.checkpoint.loading`."""

from __future__ import annotations

import functools
import os
from typing import Callable

from recbole_llm.checkpoint.loading import check_same_ids, explain_unfitting_weights, load_for_use, read_once
from recbole_llm.errors import CheckpointError


def wrap_load_data_and_model(original: Callable) -> Callable:
    """``load_data_and_model`` as :func:`load_for_use`: the checkpoint read once, safely."""

    @functools.wraps(original)
    def load_data_and_model(model_file):
        return load_for_use(model_file)

    return load_data_and_model


def wrap_resume_checkpoint(original: Callable) -> Callable:
    """``Trainer.resume_checkpoint`` reading the file once, safely; other data's ids and weights that do not
    fit refused in one line."""

    @functools.wraps(original)
    def resume_checkpoint(self, resume_file):
        with read_once(resume_file, map_location=self.device) as checkpoint:
            check_same_ids(checkpoint["config"], self.config, os.fspath(resume_file))
            try:
                return original(self, resume_file)
            except RuntimeError as error:
                explained = explain_unfitting_weights(error, os.fspath(resume_file))
                if explained is None:
                    raise
                raise explained from None

    return resume_checkpoint


def wrap_load_other_parameter(original: Callable) -> Callable:
    """``load_other_parameter`` setting only the attributes the model itself declares (``other_parameter_name``,
    what its ``other_parameter`` saves): a checkpoint naming any other would overwrite a setting or a method."""

    @functools.wraps(original)
    def load_other_parameter(self, para):
        if para is None:
            return original(self, para)
        declared = set(getattr(self, "other_parameter_name", ()) or ())
        if not isinstance(para, dict) or set(para) - declared:
            names = sorted(map(str, set(para) - declared)) if isinstance(para, dict) else [type(para).__name__]
            raise CheckpointError(
                f"refusing the checkpoint's other_parameter {names[:3]}: {type(self).__name__} keeps "
                f"{sorted(declared) or 'none'}; load only checkpoints saved by RecBole or recbole_llm for this model"
            )
        return original(self, para)

    return load_other_parameter


def wrap_evaluate(original: Callable) -> Callable:
    """``Trainer.evaluate(load_best_model=True)`` reading the best checkpoint once, safely."""

    @functools.wraps(original)
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if not (eval_data and load_best_model):
            return original(self, eval_data, load_best_model, model_file, show_progress)
        with read_once(model_file or self.saved_model_file, map_location=self.device):
            return original(self, eval_data, load_best_model, model_file, show_progress)

    return evaluate
