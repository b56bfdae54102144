"""RecBole 1.2.1's evaluation, each body wrapping a RecBole function rather than copying it
(:mod:`recbole_llm.patches` installs them, each naming the RecBole line it answers):

- RecBole's metrics return numpy scalars; numpy 2 prints them as ``np.float64(0.05)``, so the result
  dicts RecBole logs stop being plain Python literals. ``Evaluator.evaluate`` returns Python floats.
- Sampled evaluation (``eval_args`` mode ``uniN`` / ``popN``) drew new negatives at every evaluation
  (RUCAIBox/RecBole#2077): each evaluation batch now draws from a generator seeded by the config's seed.
"""

from __future__ import annotations

import functools


_PHASES = {"valid": 1, "test": 2}


def wrap_eval_collate_fn(original):
    """``NegSampleEvalDataLoader.collate_fn`` draws each batch's negatives from its own seeded generator.

    RecBole's samplers draw from numpy's global generator, so with ``eval_args`` mode ``uniN`` / ``popN`` every
    evaluation ranks the target against other negatives (RUCAIBox/RecBole#2077): one checkpoint scored
    differently in the run, in ``recbole-llm evaluate`` and in each repeated evaluation. Each batch now draws
    from ``SeedSequence([seed, phase, first row, rows])``: the same checkpoint, seed and ``eval_batch_size``
    give the same negatives and figures wherever and however often it is evaluated (with ``worker`` > 0 too),
    and evaluating no longer moves the global generator that training's own sampling continues from.
    """
    import numpy as np

    @functools.wraps(original)
    def collate_fn(self, index):
        seed = self.config["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or len(index) == 0:
            return original(self, index)
        phase = getattr(self._sampler, "phase", None) or "test"
        words = [seed % 2**32, _PHASES.get(phase, 0), int(index[0]), len(index)]
        saved = np.random.get_state()
        np.random.seed(np.random.SeedSequence(words).generate_state(1)[0])
        try:
            return original(self, index)
        finally:
            np.random.set_state(saved)

    return collate_fn


def wrap_evaluator_evaluate(original):
    """``Evaluator.evaluate`` returns Python floats: numpy 2 prints numpy scalars as ``np.float64(0.05)``."""

    @functools.wraps(original)
    def evaluate(self, dataobject):
        import numpy as np

        result = original(self, dataobject)
        for key, value in result.items():
            if isinstance(value, np.generic):
                result[key] = value.item()
        return result

    return evaluate
