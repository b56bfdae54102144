"""Metrics registered with RecBole's evaluator: F1@K and long-tail NDCG@K / Recall@K.

Use them by name like RecBole's own (``metrics: [Recall, NDCG, F1, TailNDCG, TailRecall]``); they work
for every model, RecBole's included.

- ``F1@K``: per user the harmonic mean of Precision@K and Recall@K (0 where both are 0), averaged.
- ``TailNDCG@K`` / ``TailRecall@K``: RecBole's NDCG@K and Recall@K over the test users whose target item
  had at most ``tail_threshold`` interactions in the training data (long-tail and cold-start targets;
  items never seen in training count 0). Averaged over those users only; 0 when there are none.

The tail metrics need each row's target item, which RecBole's collector does not keep: the collector is
taught one more resource, ``rec.positive_items`` (the first positive item id of each evaluated row).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from recbole.evaluator.base_metric import TopkMetric
from recbole.evaluator.metrics import NDCG, Recall
from recbole.utils import EvaluatorType

POSITIVE_ITEMS = "rec.positive_items"


class F1(TopkMetric):
    r"""F1@K: the harmonic mean of Precision@K and Recall@K, per user, averaged over users."""

    metric_type = EvaluatorType.RANKING
    metric_need = ["rec.topk"]
    smaller = False

    def calculate_metric(self, dataobject):
        pos_index, pos_len = self.used_info(dataobject)
        hits = np.cumsum(pos_index, axis=1)
        precision = hits / np.arange(1, pos_index.shape[1] + 1)
        recall = hits / pos_len.reshape(-1, 1)
        total = precision + recall
        f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total, dtype=float), where=total > 0)
        return self.topk_result("f1", f1)


class _TailMetric(TopkMetric):
    metric_type = EvaluatorType.RANKING
    metric_need = ["rec.topk", POSITIVE_ITEMS, "data.count_items"]
    smaller = False
    base_metric: type = NDCG
    name = ""

    def __init__(self, config):
        super().__init__(config)
        self.tail_threshold = config["tail_threshold"]
        self.base = self.base_metric(config)

    def tail_rows(self, dataobject) -> np.ndarray:
        targets = dataobject.get(POSITIVE_ITEMS).numpy()
        counts = dataobject.get("data.count_items")
        return np.array([counts.get(int(item), 0) <= self.tail_threshold for item in targets], dtype=bool)

    def calculate_metric(self, dataobject):
        pos_index, pos_len = self.used_info(dataobject)
        tail = self.tail_rows(dataobject)
        if not tail.any():
            return {f"{self.name}@{k}": 0.0 for k in self.topk}
        value = self.base.metric_info(pos_index[tail], pos_len[tail])
        return self.topk_result(self.name, value)


class TailNDCG(_TailMetric):
    r"""NDCG@K over test rows whose target had at most ``tail_threshold`` training interactions."""

    base_metric = NDCG
    name = "tailndcg"


class TailRecall(_TailMetric):
    r"""Recall@K over test rows whose target had at most ``tail_threshold`` training interactions."""

    base_metric = Recall
    name = "tailrecall"


PLUGIN_METRICS = (F1, TailNDCG, TailRecall)


def register() -> None:
    """Put the metrics in RecBole's metric tables, where ``metrics: [...]`` finds them by name. Idempotent."""
    from recbole.evaluator import register as tables

    for metric in PLUGIN_METRICS:
        name = metric.__name__.lower()
        tables.metrics_dict[name] = metric
        tables.metric_information[name] = metric.metric_need
        tables.metric_types[name] = metric.metric_type


def wrap_eval_batch_collect(original):
    """``Collector.eval_batch_collect`` also keeps ``rec.positive_items`` when a metric needs it."""

    @functools.wraps(original)
    def eval_batch_collect(self, scores_tensor, interaction, positive_u, positive_i):
        original(self, scores_tensor, interaction, positive_u, positive_i)
        if self.register.need(POSITIVE_ITEMS):
            first = torch.full((scores_tensor.shape[0],), -1, dtype=torch.long, device=positive_i.device)
            # rows with several positives keep their first one (leave-one-out has exactly one)
            first[positive_u.flip(0)] = positive_i.flip(0)
            self.data_struct.update_tensor(POSITIVE_ITEMS, first)

    return eval_batch_collect


def wrap_get_data_struct(original):
    """``Collector.get_data_struct`` with non-tensor resources (``data.count_items``) passed through."""

    @functools.wraps(original)
    def get_data_struct(self):
        # RecBole calls .cpu() on every resource, but data.count_items is a Counter (RecBole's own
        # AveragePopularity fails the same way): set non-tensors aside while it does.
        stored = self.data_struct._data_dict
        others = {key: value for key, value in stored.items() if not isinstance(value, torch.Tensor)}
        for key in others:
            del stored[key]
        returned = original(self)
        stored.update(others)
        returned._data_dict.update(others)
        if POSITIVE_ITEMS in self.data_struct:
            del self.data_struct[POSITIVE_ITEMS]  # per evaluation, like RecBole's own rec.* resources
        return returned

    return get_data_struct
