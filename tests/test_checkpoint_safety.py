"""Crafted checkpoints: no code runs from a .pth, through any admitted global or any entry point.

Each payload is written into a real checkpoint (real weights beside it), the way an attacker would ship
one. A payload that ran would create a sentinel file; every load must instead fail with a one-line
RecboleLLMError (or load harmlessly), and the sentinel must never appear.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import train_checkpoint
from recbole_llm import RecboleLLMError, load_checkpoint
from recbole_llm.checkpoint import allowed_globals

PLACEHOLDER = "PAYLOAD_GOES_HERE_0123456789"


def code(sentinel: Path) -> str:
    """Python that RecBole's Config would eval, and that would leave the sentinel behind."""
    return f"__import__('pathlib').Path({str(sentinel)!r}).write_text('ran')"


def argument_sets(sentinel: Path) -> list[tuple]:
    source, shell = code(sentinel), f"touch {sentinel}"
    return [
        (source,),
        (shell,),
        (None, None, None, {"payload": source}),  # Config(model, dataset, config_file_list, config_dict)
        (source, source, [source], {"payload": source}),
    ]


def call_ops(global_name: str, args: tuple, opcode: bytes = pickle.REDUCE) -> bytes:
    """Opcodes that push ``global_name`` and call it (REDUCE) or create it (NEWOBJ) with ``args``."""
    module, name = global_name.rsplit(".", 1)
    arguments = pickle.dumps(args, protocol=0)[:-1]  # protocol 0: no PROTO/FRAME, drop STOP
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n" + arguments + opcode


def build_ops(global_name: str, sentinel: Path) -> bytes:
    """Create an instance with NEWOBJ() and BUILD it with a state that names the payload."""
    state = pickle.dumps({"final_config_dict": {"payload": code(sentinel)}}, protocol=0)[:-1]
    return call_ops(global_name, (), pickle.NEWOBJ) + state + pickle.BUILD


def nested_call_ops(function: str, class_name: str, sentinel: Path) -> bytes:
    """``function(C, C, (None, None, None, {...}), {})``: an admitted function handed a class to call."""
    module, name = function.rsplit(".", 1)
    class_module, class_attr = class_name.rsplit(".", 1)
    config_args = pickle.dumps((None, None, None, {"payload": code(sentinel)}), protocol=0)[:-1]
    klass = b"c" + class_module.encode() + b"\n" + class_attr.encode() + b"\n"
    return (b"c" + module.encode() + b"\n" + name.encode() + b"\n" + pickle.MARK + klass + klass
            + config_args + b"}" + pickle.TUPLE + pickle.REDUCE)


def plant(real: Path, ops: bytes, target: Path) -> Path:
    """``real`` with ``ops`` in place of its ``other_parameter`` value, as a torch zip checkpoint."""
    checkpoint = torch.load(real, weights_only=False)  # our own file, written by this test's training run
    checkpoint["other_parameter"] = PLACEHOLDER
    plain = target.with_suffix(".plain")
    torch.save(checkpoint, plain, pickle_protocol=2)  # protocol 2: no frames, so bytes can be swapped
    marker = b"X" + struct.pack("<I", len(PLACEHOLDER)) + PLACEHOLDER.encode()
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as out:
        for entry in source.infolist():
            data = source.read(entry)
            if entry.filename.endswith("/data.pkl"):
                assert data.count(marker) == 1
                data = data.replace(marker, ops)
            out.writestr(entry, data)
    plain.unlink()
    return target


@pytest.fixture(scope="module")
def real_checkpoint(data_root, tmp_path_factory) -> Path:
    return train_checkpoint(tmp_path_factory.mktemp("real"), "BERTRec", "ml-tiny", {
        "data_path": str(data_root), "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "pretrained_model_name_or_path": None, "n_layers": 1, "n_heads": 2, "hidden_size": 32,
        "inner_size": 64, "MAX_ITEM_LIST_LENGTH": 10, "epochs": 1, "save_latest": True})


def test_a_planted_harmless_value_loads(real_checkpoint, tmp_path):
    """The planting itself works: a payload that is plain data loads with the real weights."""
    crafted = plant(real_checkpoint, pickle.dumps("just data", protocol=0)[:-1], tmp_path / "ok.pth")
    loaded = load_checkpoint(crafted)
    assert loaded["other_parameter"] == "just data" and loaded["state_dict"]


def assert_refused_or_harmless(path: Path, sentinel: Path) -> None:
    try:
        load_checkpoint(path)
    except RecboleLLMError as error:
        assert "\n" not in str(error)
    assert not sentinel.exists(), f"code ran while loading {path.name}"


def test_every_admitted_global_called_created_or_built_runs_no_code(real_checkpoint, tmp_path):
    sentinel = tmp_path / "sentinel"
    names = sorted(allowed_globals())
    assert "recbole.config.configurator.Config" in names and len(names) > 100
    for index, name in enumerate(names):
        payloads = [call_ops(name, args) for args in argument_sets(sentinel)]
        payloads += [call_ops(name, argument_sets(sentinel)[2], pickle.NEWOBJ), build_ops(name, sentinel)]
        for number, ops in enumerate(payloads):
            assert_refused_or_harmless(plant(real_checkpoint, ops, tmp_path / f"{index}-{number}.pth"), sentinel)


def test_config_and_model_classes_are_never_called(real_checkpoint, tmp_path):
    """RecBole's Config evals strings of its config_dict: calling it from a checkpoint is refused."""
    sentinel = tmp_path / "sentinel"
    config_call = call_ops("recbole.config.configurator.Config", argument_sets(sentinel)[2])
    with pytest.raises(RecboleLLMError, match="refusing to load .*unsupported call of Config"):
        load_checkpoint(plant(real_checkpoint, config_call, tmp_path / "config.pth"))
    model_call = call_ops("recbole_llm.model.bertrec.BERTRec", argument_sets(sentinel)[2])
    with pytest.raises(RecboleLLMError, match="refusing to load"):
        load_checkpoint(plant(real_checkpoint, model_call, tmp_path / "model.pth"))
    assert not sentinel.exists()


def test_admitted_functions_cannot_be_handed_a_class_to_call(real_checkpoint, tmp_path):
    """torch's _rebuild_from_type_v2(func, ...) calls func: handing it Config must not run Config."""
    sentinel = tmp_path / "sentinel"
    names = allowed_globals()
    not_callable = ["recbole.config.configurator.Config", "yaml.loader.FullLoader",
                    "recbole_llm.model.bertrec.BERTRec", "recbole.utils.enum_type.ModelType"]
    functions = [name for name, obj in names.items() if callable(obj) and not isinstance(obj, type)]
    assert "torch._tensor._rebuild_from_type_v2" in functions
    for index, function in enumerate(sorted(functions)):
        for klass in not_callable:
            ops = nested_call_ops(function, klass, sentinel)
            assert_refused_or_harmless(plant(real_checkpoint, ops, tmp_path / f"n{index}.pth"), sentinel)


def test_opcodes_that_construct_objects_are_refused(real_checkpoint, tmp_path):
    for opcode_ops in (b"(irecbole.config.configurator\nConfig\n", b"(crecbole.config.configurator\nConfig\no"):
        with pytest.raises(RecboleLLMError, match="refusing to load .*opcode"):
            load_checkpoint(plant(real_checkpoint, opcode_ops, tmp_path / "inst.pth"))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recbole_llm", *args], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_every_entry_point_refuses_the_config_payload(real_checkpoint, data_root, tmp_path):
    """evaluate, export, resume_from, load_checkpoint and RecBole's load_data_and_model."""
    from recbole.quick_start import load_data_and_model

    sentinel = tmp_path / "sentinel"
    crafted = plant(real_checkpoint, call_ops("recbole.config.configurator.Config", argument_sets(sentinel)[2]),
                    tmp_path / "crafted.pth")
    for result in (cli("evaluate", f"--checkpoint={crafted}"),
                   cli("export", "--checkpoint", str(crafted), "--output", str(tmp_path / "artifact"))):
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and "refusing to load" in result.stderr
        assert not (tmp_path / "artifact").exists()
    with pytest.raises(RecboleLLMError, match="refusing to load"):
        load_data_and_model(str(crafted))
    resume = cli("run", "--model=BERTRec", "--dataset=ml-tiny", f"--data_path={data_root}",
                 "--load_col={'inter': ['user_id', 'item_id', 'timestamp']}", "--pretrained_model_name_or_path=None",
                 "--n_layers=1", "--n_heads=2", "--hidden_size=32", "--inner_size=64", "--MAX_ITEM_LIST_LENGTH=10",
                 "--epochs=2", "--show_progress=False", f"--checkpoint_dir={tmp_path / 'saved'}",
                 f"--resume_from={crafted}")
    assert resume.returncode == 2, resume.stderr[-2000:]
    assert "refusing to load" in resume.stderr and "Traceback" not in resume.stderr
    assert not sentinel.exists()


def test_a_checkpoint_saved_on_cuda_loads_on_this_cpu(real_checkpoint, tmp_path):
    """Storages tagged as CUDA and a Config whose device is CUDA: mapped to the CPU, the device follows."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the checkpoint would load on the GPU")
    checkpoint = torch.load(real_checkpoint, weights_only=False)
    checkpoint["config"].final_config_dict["device"] = torch.device("cuda")
    checkpoint["config"].final_config_dict["use_gpu"] = True
    plain = tmp_path / "plain.pth"
    torch.save(checkpoint, plain, pickle_protocol=2)  # no frames: the tag can change length
    cuda_tagged = tmp_path / "cuda.pth"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(cuda_tagged, "w", zipfile.ZIP_STORED) as out:
        for entry in source.infolist():
            data = source.read(entry)
            if entry.filename.endswith("/data.pkl"):  # every storage's location tag: "cpu" -> "cuda:0"
                cpu, cuda = (b"X" + struct.pack("<I", len(tag)) + tag for tag in (b"cpu", b"cuda:0"))
                assert cpu in data
                data = data.replace(cpu, cuda)
            out.writestr(entry, data)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(cuda_tagged, weights_only=False)  # what torch does without the mapping

    loaded = load_checkpoint(cuda_tagged, map_location=None)
    assert loaded["config"]["device"] == torch.device("cpu")
    assert all(t.device.type == "cpu" for t in loaded["state_dict"].values())
    for name, tensor in torch.load(real_checkpoint, weights_only=False)["state_dict"].items():
        assert torch.equal(loaded["state_dict"][name], tensor)
    evaluate = cli("evaluate", f"--checkpoint={cuda_tagged}")
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    assert "test result" in evaluate.stdout + evaluate.stderr
    export = cli("export", "--checkpoint", str(cuda_tagged), "--output", str(tmp_path / "artifact"))
    assert export.returncode == 0, export.stderr[-2000:]


def test_a_checkpoint_cannot_point_recbole_at_a_pickle(real_checkpoint, tmp_path):
    """A crafted Config naming a saved dataset/dataloaders file (here a payload pickle) would make RecBole
    pickle.load it; and torch's legacy tar format lets a file start with a pickle. Both are refused."""
    sentinel = tmp_path / "sentinel"
    payload = tmp_path / "payload.pkl"
    payload.write_bytes(call_ops("posix.system", (f"touch {sentinel}",)).replace(b"cposix", b"\x80\x02cposix", 1)
                        + b".")
    checkpoint = torch.load(real_checkpoint, weights_only=False)  # ours
    for key in ("dataset_save_path", "dataloaders_save_path"):
        checkpoint["config"].final_config_dict[key] = str(payload)
    pointing = tmp_path / "pointing.pth"
    torch.save(checkpoint, pointing)
    result = cli("evaluate", f"--checkpoint={pointing}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert load_checkpoint(pointing)["config"]["dataset_save_path"] is None
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(payload.read_bytes() + b"\0" * 512)  # not a zip: torch's legacy formats are refused
    assert cli("evaluate", f"--checkpoint={legacy}").returncode == 2
    with pytest.raises(RecboleLLMError, match="is not a RecBole checkpoint"):
        load_checkpoint(legacy)
    assert not sentinel.exists()


@pytest.mark.parametrize("key, value", [("model", "/tmp/elsewhere/dir"), ("dataset", "../../etc"),
                                        ("model", "NoSuchModel")])
def test_a_checkpoint_config_names_a_model_and_a_dataset_not_paths(real_checkpoint, tmp_path, key, value):
    checkpoint = torch.load(real_checkpoint, weights_only=False)  # ours
    checkpoint["config"].final_config_dict[key] = value
    crafted = tmp_path / "crafted.pth"
    torch.save(checkpoint, crafted)
    with pytest.raises(RecboleLLMError, match=f"refusing to load .*unsupported config: {key}"):
        load_checkpoint(crafted)
