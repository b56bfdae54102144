"""Every change the plugin makes to RecBole 1.2.1: one list, installed once, each entry naming what it answers.

An entry is a :class:`Patch`: the RecBole module or class attribute it replaces, the function that makes
the replacement from RecBole's own, and the RecBole 1.2.1 source line it answers. The bodies live with
their topic (:mod:`recbole_llm.patches.stack`: today's stack; :mod:`recbole_llm.patches.config`,
:mod:`recbole_llm.patches.data` and :mod:`recbole_llm.patches.evaluator`: Config, datasets and evaluation,
with one-line errors; :mod:`recbole_llm.patches.seen_items`: ``repeatable: False`` for sequential models;
:mod:`recbole_llm.patches.checkpoints`: safe, read-once loading; :mod:`recbole_llm.patches.models`: the
plugin's models and RecBole's Pop; :mod:`recbole_llm.training.distributed`: DDP on CPU;
:mod:`recbole_llm.training.metrics`: the plugin's metrics; the export hook here); this module only installs
them, in the order :func:`patches` lists.

Every replacement keeps RecBole's attribute as its ``__wrapped__`` (a body calls through to it, and
``checkpoint.load_for_use`` reaches RecBole's own ``load_data_and_model`` that way) and is marked, so that
applying a patch twice changes nothing. Importing this module imports neither torch nor RecBole.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from typing import Any, Callable

MARK = "__recbole_llm__"  # set on every replacement: this attribute is the plugin's already


@dataclasses.dataclass(frozen=True)
class Patch:
    """One replaced (or added) attribute of RecBole."""

    owner: Any  # the RecBole module or class whose attribute is replaced
    name: str  # the attribute
    make: Callable[[Any], Any]  # RecBole's attribute (None for an added method) -> the replacement
    answers: str  # the RecBole 1.2.1 source line it answers, and why
    also: tuple[Any, ...] = ()  # modules that bound the same function by name at import: rebound with it
    add: bool = False  # a method RecBole lacks: only where the owner does not define it itself

    def apply(self) -> None:
        """Replace the attribute, once: a second call (or a second ``install``) changes nothing."""
        current = self.owner.__dict__.get(self.name) if self.add else getattr(self.owner, self.name)
        if getattr(current, MARK, False) or (self.add and current is not None):
            return  # applied already, or the class defines its own (plugin models do)
        replacement = self.make(current)
        if current is not None:
            replacement.__wrapped__ = current
        setattr(replacement, MARK, True)
        setattr(self.owner, self.name, replacement)
        for module in self.also:
            if getattr(module, self.name, None) is current:
                setattr(module, self.name, replacement)


def instead(replacement: Any) -> Callable[[Any], Any]:
    """``make`` for a replacement that does not call RecBole's own."""
    return lambda _recbole: replacement


# ---------------------------------------------------------------------------------------------------------
# the export hook (recbole_llm.model.contract.Exportable) for RecBole's sequential models


def export_scores(self, item_seq, item_length):
    """Scores of every item, ``[batch, n_items]``: the model's own ``full_sort_predict``."""
    return self.full_sort_predict({self.ITEM_SEQ: item_seq, self.ITEM_SEQ_LEN: item_length})


def bert4rec_export_scores(self, item_seq, item_length):
    """BERT4Rec's ``full_sort_predict`` with the mask token placed by one scatter instead of a Python loop
    over the batch, which a trace would unroll for the example batch size."""
    import torch

    padded = torch.cat((item_seq, torch.zeros_like(item_seq[:, :1])), dim=-1)
    mask = torch.full_like(item_length.unsqueeze(-1), self.mask_token)
    padded = padded.scatter(1, item_length.unsqueeze(-1), mask)[:, 1:]
    hidden = self.gather_indexes(self.forward(padded), item_length - 1)
    return hidden @ self.item_embedding.weight[: self.n_items].t() + self.output_bias


# ---------------------------------------------------------------------------------------------------------
# the list


def _modules(*names: str) -> tuple[Any, ...]:
    return tuple(importlib.import_module(name) for name in names)


def patches() -> list[Patch]:
    """Every patch, in the order :func:`install` applies them.

    The patches are independent of each other except where a comment says so; they are listed in the order
    a run meets them (Config, dataset, dataloaders, model, trainer, evaluator, checkpoints, DDP, export), so
    that the list reads like RecBole's own path. Rebinding a function that modules imported by name must
    come after those modules are imported, which :func:`_modules` does here.
    """
    from recbole.config.configurator import Config
    from recbole.data import utils as data_utils
    from recbole.data.dataloader.general_dataloader import FullSortEvalDataLoader, NegSampleEvalDataLoader
    from recbole.data.dataset.dataset import Dataset
    from recbole.data.dataset.sequential_dataset import SequentialDataset
    from recbole.evaluator.collector import Collector
    from recbole.evaluator.evaluator import Evaluator
    from recbole.model.abstract_recommender import AbstractRecommender, SequentialRecommender
    from recbole.model.general_recommender.pop import Pop
    from recbole.model.sequential_recommender.bert4rec import BERT4Rec
    from recbole.quick_start import quick_start
    from recbole.trainer import trainer
    from recbole.utils import utils

    from recbole_llm.patches import checkpoints as checkpoint
    from recbole_llm.patches import config, data, evaluator, seen_items, stack
    from recbole_llm.patches import models as registry
    from recbole_llm.training import distributed, metrics

    return [
        # -- Config, in the order Config.__init__ calls them (configurator.py lines 80-94) --
        # First, because every Config() runs it before anything else and fails on numpy 2 without it.
        Patch(Config, "compatibility_settings", instead(stack.compatibility_settings),
              "recbole/config/configurator.py:625 Config.compatibility_settings assigns np.float_ and friends, "
              "which numpy 2 removed: only the aliases numpy lacks are added"),
        Patch(Config, "_load_config_files", config.wrap_load_config_files,
              "recbole/config/configurator.py:149 Config._load_config_files: a file that does not read or parse "
              "fails in one line naming file and line"),
        Patch(Config, "_load_variable_config_dict", config.wrap_load_variable_config_dict,
              "recbole/config/configurator.py:159 Config._load_variable_config_dict pickles Path and numpy values "
              "into checkpoints the allow-list refuses: plain Python values"),
        Patch(Config, "_load_cmd_line", config.wrap_load_cmd_line,
              "recbole/config/configurator.py:165 Config._load_cmd_line splits --key=value at every '=' and drops "
              "a value holding one (a path like /data/day=1) with a warning: split at the first"),
        Patch(Config, "_update_internal_config_dict", registry.wrap_update_internal_config_dict,
              "recbole/config/configurator.py:231/240 reads only RecBole's own property files: the plugin's "
              "overall.yaml and model YAMLs are read right after RecBole's overall.yaml"),
        # After the property files: the checks read the merged values (defaults from the plugin's YAMLs).
        Patch(Config, "_set_default_parameters", config.wrap_set_default_parameters,
              "recbole/config/configurator.py:327/346 Config._set_default_parameters: CE with RecBole's default "
              "sampler fails, values fail late; CE gets no sampling, values and encoder limits checked first; "
              "line 378 refuses repeatable: False for sequential models: accepted (seen_items masks); line 330 "
              "ignores a data_path given for ml-100k: read when it holds ml-100k"),
        # One wrapper for both concerns: gloo set-up needs dist_backend, anomaly detection detect_anomaly.
        Patch(Config, "_init_device", config.wrap_init_device,
              "recbole/config/configurator.py:476/494 Config._init_device hard-codes nccl (no DDP on CPU), and "
              "sine.py:25 left anomaly detection on: gloo for CPU ranks, detect_anomaly decides"),
        # -- dataset and dataloaders --
        Patch(Dataset, "_download", data.wrap_download,
              "recbole/data/dataset/dataset.py:232 Dataset._download prompts on stdin (utils/url.py:27) for a "
              "dataset not on disk, which hangs offline: a one-line error unless allow_download"),
        Patch(Dataset, "_get_load_and_unload_col", data.wrap_get_load_and_unload_col,
              "recbole/data/dataset/dataset.py:388 Dataset._get_load_and_unload_col: load_col can leave out the "
              "time field sequential models order by: it is loaded"),
        Patch(Dataset, "_load_feat", data.wrap_load_feat,
              "recbole/data/dataset/dataset.py:427 Dataset._load_feat fails deep in pandas on a bad header, id "
              "field or row: one line naming file, line and fix"),
        Patch(Dataset, "_dataframe_to_interaction", data.wrap_dataframe_to_interaction,
              "recbole/data/dataset/dataset.py:2188/2207 Dataset._dataframe_to_interaction makes float fields float32 "
              "(torch.FloatTensor) before histories are sorted by time: Unix seconds round to 128 s and close "
              "events keep file order (RecBole#2204); the time field stays float64"),
        Patch(data_utils, "create_dataset", data.wrap_create_dataset,
              "recbole/data/utils.py:28/61 create_dataset pickle.loads <checkpoint_dir>/<dataset>-<Class>.pth if "
              "it exists: only a named dataset_save_path; and the data's ids are recorded or checked",
              also=_modules("recbole.data", "recbole.quick_start.quick_start")),
        Patch(data_utils, "create_samplers", seen_items.wrap_create_samplers,
              "recbole/data/utils.py:333/351 create_samplers picks the non-repeatable Sampler by repeatable, which "
              "sequential models never had: with repeatable: False they keep RecBole's RepeatableSampler",
              also=_modules("recbole.data")),
        Patch(SequentialDataset, "data_augmentation", seen_items.wrap_data_augmentation,
              "recbole/data/dataset/sequential_dataset.py:77 data_augmentation keeps only the last "
              "MAX_ITEM_LIST_LENGTH items of a row's history: with repeatable: False each user's whole sequence "
              "and each row's full history length are kept too"),
        Patch(FullSortEvalDataLoader, "collate_fn", seen_items.wrap_full_sort_collate_fn,
              "recbole/data/dataloader/general_dataloader.py:258/282 FullSortEvalDataLoader.collate_fn gives "
              "sequential rows no history to mask: with repeatable: False every earlier item of the user"),
        Patch(NegSampleEvalDataLoader, "collate_fn", evaluator.wrap_eval_collate_fn,
              "recbole/data/dataloader/general_dataloader.py:150/180 NegSampleEvalDataLoader.collate_fn samples "
              "evaluation negatives from numpy's global generator, new ones at every evaluation (RecBole#2077): "
              "each batch from a generator seeded by the config seed"),
        Patch(data_utils, "save_split_dataloaders", data.wrap_save_split_dataloaders,
              "recbole/data/utils.py:78/94 save_split_dataloaders sets each loader's generator to None and never "
              "restores it: restored, so saving does not change the run"),
        Patch(data_utils, "load_split_dataloaders", data.wrap_load_split_dataloaders,
              "recbole/data/utils.py:102/122 load_split_dataloaders pickle.loads RecBole's default file if it "
              "exists: only a named dataloaders_save_path"),
        Patch(utils, "ensure_dir", instead(stack.ensure_dir),
              "recbole/utils/utils.py:44 ensure_dir checks, then creates: two DDP ranks race to FileExistsError",
              also=_modules("recbole.utils", "recbole.utils.logger", "recbole.trainer.trainer",
                            "recbole.data.dataset.dataset", "recbole.data.utils")),
        # -- model and trainer lookup --
        Patch(utils, "get_model", registry.wrap_get_model,
              "recbole/utils/utils.py:55 get_model knows only recbole.model.*: the plugin's models first, an "
              "unknown name or a missing optional package in one line",
              also=_modules("recbole.utils", "recbole.config.configurator", "recbole.quick_start.quick_start",
                            "recbole.quick_start", "recbole.data.dataloader.abstract_dataloader")),
        Patch(utils, "get_trainer", registry.wrap_get_trainer,
              "recbole/utils/utils.py:88 get_trainer knows only RecBole's trainers: PluginTrainer for plugin models",
              also=_modules("recbole.utils", "recbole.quick_start.quick_start", "recbole.quick_start")),
        Patch(utils, "get_flops", registry.wrap_get_flops,
              "recbole/utils/utils.py:250 get_flops fails on peft wrappers (thop's total_ops buffer): counted on "
              "a merged copy", also=_modules("recbole.utils", "recbole.quick_start.quick_start")),
        # -- RecBole's own models --
        # The two Pop patches go together: calculate_loss reads the label field __init__ keeps.
        Patch(Pop, "__init__", registry.wrap_pop_init,
              "recbole/model/general_recommender/pop.py:32 Pop.__init__ keeps no label field, which marks the "
              "negatives pointwise sampling adds: kept when sampling is on"),
        Patch(Pop, "calculate_loss", instead(registry.pop_calculate_loss),
              "recbole/model/general_recommender/pop.py:45 Pop.calculate_loss adds one per distinct item of a "
              "batch (an index assignment drops duplicates), counts sampled negatives and, under DDP, only its rank's "
              "share: each real interaction once, summed over ranks"),
        # -- evaluator --
        Patch(Collector, "eval_batch_collect", metrics.wrap_eval_batch_collect,
              "recbole/evaluator/collector.py:137 Collector.eval_batch_collect keeps no target item: "
              "rec.positive_items for TailNDCG / TailRecall"),
        Patch(Collector, "get_data_struct", metrics.wrap_get_data_struct,
              "recbole/evaluator/collector.py:222/227 Collector.get_data_struct calls .cpu() on every resource, "
              "a Counter too: non-tensors pass through"),
        Patch(Evaluator, "evaluate", evaluator.wrap_evaluator_evaluate,
              "recbole/evaluator/evaluator.py:27 Evaluator.evaluate returns numpy scalars, logged as np.float64(...) "
              "on numpy 2: Python floats"),
        # -- checkpoints: torch >= 2.6 refuses RecBole's, and a checkpoint may come from anyone --
        Patch(trainer.Trainer, "evaluate", checkpoint.wrap_evaluate,
              "recbole/trainer/trainer.py:562/583 Trainer.evaluate(load_best_model=True) torch.loads with "
              "weights_only: read once through the allow-list"),
        Patch(trainer.Trainer, "resume_checkpoint", checkpoint.wrap_resume_checkpoint,
              "recbole/trainer/trainer.py:314/323 Trainer.resume_checkpoint torch.loads with weights_only: read "
              "once through the allow-list; other data's ids and unfitting weights refused in one line"),
        Patch(AbstractRecommender, "load_other_parameter", checkpoint.wrap_load_other_parameter,
              "recbole/model/abstract_recommender.py:72/76 load_other_parameter sets every key of a checkpoint's "
              "other_parameter as a model attribute: only the names the model declares (other_parameter_name)"),
        Patch(quick_start, "load_data_and_model", checkpoint.wrap_load_data_and_model,
              "recbole/quick_start/quick_start.py:233/250 load_data_and_model torch.loads with weights_only: "
              "checkpoint.load_for_use, which reads once through the allow-list",
              also=_modules("recbole.quick_start")),
        # -- DDP (the gloo process group itself is Config._init_device above) --
        Patch(trainer, "DistributedDataParallel", instead(distributed.cpu_aware_ddp),
              "recbole/trainer/trainer.py:62 DistributedDataParallel(model, device_ids=[local_rank]): torch "
              "refuses device ids for a CPU module"),
        Patch(quick_start, "run_recboles", instead(distributed.run_recboles),
              "recbole/quick_start/quick_start.py:182 run_recboles, spawned by mp.spawn at line 83: a spawned rank "
              "must install the plugin before RecBole builds a plugin model"),
        # -- export: the one hook export traces (recbole_llm.model.contract.Exportable) --
        # Before BERT4Rec's: its own replaces the inherited one there.
        Patch(SequentialRecommender, "export_scores", instead(export_scores),
              "recbole/model/abstract_recommender.py:146 SequentialRecommender has no scoring entry export can "
              "trace on tensors: full_sort_predict on an interaction dict", add=True),
        Patch(BERT4Rec, "export_scores", instead(bert4rec_export_scores),
              "recbole/model/sequential_recommender/bert4rec.py:109/117 reconstruct_test_data places the mask "
              "token with a Python loop over the batch, which a trace unrolls: one scatter", add=True),
    ]


def install() -> None:
    """Apply every patch once, in :func:`patches` order, and set the state RecBole leaves wrong. Idempotent;
    ``recbole_llm`` calls it when RecBole is imported."""
    from recbole_llm.patches import stack

    stack.quiet_stack()
    # Before anything imports RecBole's quick_start: its module-level `from ray import tune` (quick_start.py:20)
    # fails where ray does not import; ray becomes optional.
    stack.import_quick_start()
    for patch in patches():
        patch.apply()

    import torch

    from recbole_llm.training import metrics

    metrics.register()  # RecBole's metric tables: entries, not replacements
    # recbole.data.dataset.<Model>Dataset for the plugin models (entries, not replacements). Importing the
    # class's module may be what installed the plugin: then it registers itself once its class exists.
    dataset = sys.modules.get("recbole_llm.training.dataset")
    if dataset is None or hasattr(dataset, "PluginSequentialDataset"):
        importlib.import_module("recbole_llm.training.dataset").register_for_plugin_models()
    # RecBole's metrics use np.float, which only Config() recreates: a process that unpickles a Config
    # (load_data_and_model) never runs it.
    stack.numpy_aliases()
    # sine.py:25 turns anomaly detection on at import, until a Config switches it: off by default.
    torch.autograd.set_detect_anomaly(False)
