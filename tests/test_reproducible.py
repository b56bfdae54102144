"""Same command, same seed, same numbers: a rerun on the same machine reproduces its metrics exactly."""

from __future__ import annotations

import re

import pytest

from helpers import cli, slice_args


def metrics(log: str) -> tuple[str, str]:
    best = re.search(r"best valid : (.*)", log)
    test = re.search(r"test result: (.*)", log)
    assert best and test, log[-3000:]
    return best.group(1), test.group(1)


@pytest.mark.slow
def test_a_rerun_reproduces_its_metrics_even_beside_saved_dataloaders(data_root, tmp_path):
    """The first run also saves its dataset and dataloaders (save_dataset, save_dataloaders) into the shared
    checkpoint_dir; RecBole 1.2.1 would silently reload them in the second run, whose numbers then drifted.
    They are loaded only from paths named with dataset_save_path / dataloaders_save_path."""
    args = ["run", "--model=BERTRec", "--dataset=ml-tiny", *slice_args(data_root), "--pretrained_model_name_or_path=None",
            "--n_layers=1", "--n_heads=2", "--hidden_size=32", "--inner_size=64", "--MAX_ITEM_LIST_LENGTH=10",
            "--epochs=2", "--reproducibility=True", f"--checkpoint_dir={tmp_path / 'saved'}"]
    first = cli(*args, "--save_dataset=True", "--save_dataloaders=True")
    assert first.returncode == 0, first.stderr[-3000:]
    assert any(p.name.endswith("-dataloader.pth") for p in (tmp_path / "saved").iterdir())
    second = cli(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert metrics(first.stdout + first.stderr) == metrics(second.stdout + second.stderr)
