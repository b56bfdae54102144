"""Crafted checkpoints: no code runs from a .pth, through any admitted global or any entry point.

The plugin's own checkpoints hold no pickle (safetensors and JSON); RecBole's own ``.pth`` files, and the
plugin's from before that, are pickles read through the allow-listed unpickler. Each payload is written
into a real checkpoint in RecBole's pickle format (real weights beside it), the way an attacker would ship
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
from recbole_llm.checkpoint.unpickler import allowed_globals

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


def as_recbole_pth(real: Path) -> dict:
    """The plugin's (pickle-free) checkpoint ``real`` as the dict RecBole's trainer would torch.save."""
    return load_checkpoint(real)


def plant(real: Path, ops: bytes, target: Path) -> Path:
    """``real`` with ``ops`` in place of its ``other_parameter`` value, as a torch zip (pickle) checkpoint."""
    checkpoint = as_recbole_pth(real)
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


@pytest.mark.slow
def test_a_planted_harmless_value_loads(real_checkpoint, tmp_path):
    """The planting itself works: a payload that is plain data loads with the real weights."""
    crafted = plant(real_checkpoint, pickle.dumps({"note": "just data"}, protocol=0)[:-1], tmp_path / "ok.pth")
    loaded = load_checkpoint(crafted)
    assert loaded["other_parameter"] == {"note": "just data"} and loaded["state_dict"]


def assert_refused_or_harmless(path: Path, sentinel: Path) -> None:
    try:
        load_checkpoint(path)
    except RecboleLLMError as error:
        assert "\n" not in str(error)
    assert not sentinel.exists(), f"code ran while loading {path.name}"


@pytest.mark.slow
def test_every_admitted_global_called_created_or_built_runs_no_code(real_checkpoint, tmp_path):
    sentinel = tmp_path / "sentinel"
    names = sorted(allowed_globals())
    assert "recbole.config.configurator.Config" in names and len(names) > 100
    for index, name in enumerate(names):
        payloads = [call_ops(name, args) for args in argument_sets(sentinel)]
        payloads += [call_ops(name, argument_sets(sentinel)[2], pickle.NEWOBJ), build_ops(name, sentinel)]
        for number, ops in enumerate(payloads):
            assert_refused_or_harmless(plant(real_checkpoint, ops, tmp_path / f"{index}-{number}.pth"), sentinel)


@pytest.mark.slow
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


@pytest.mark.slow
def test_admitted_functions_cannot_be_handed_a_class_to_call(real_checkpoint, tmp_path):
    """torch's _rebuild_from_type_v2(func, ...) calls func: handing it Config must not run Config."""
    sentinel = tmp_path / "sentinel"
    names = allowed_globals()
    not_callable = ["recbole.config.configurator.Config", "yaml.loader.FullLoader",
                    "recbole_llm.model.bertrec.BERTRec", "recbole.utils.enum_type.ModelType"]
    functions = [name for name, obj in names.items() if callable(obj) and not isinstance(obj, type)]
    # the rebuild that calls its first argument is not admitted at all (nor are its kin)
    assert "torch._tensor._rebuild_from_type_v2" not in functions
    assert "torch._utils._rebuild_wrapper_subclass" not in functions
    for index, function in enumerate(sorted(functions) + ["torch._tensor._rebuild_from_type_v2"]):
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


def resume_run(data_root: Path, saved: Path, resume_file: Path) -> subprocess.CompletedProcess:
    """``recbole-llm run --resume_from=resume_file`` with the settings real_checkpoint was trained with, 2 epochs."""
    return cli("run", "--model=BERTRec", "--dataset=ml-tiny", f"--data_path={data_root}",
               "--load_col={'inter': ['user_id', 'item_id', 'timestamp']}", "--pretrained_model_name_or_path=None",
               "--n_layers=1", "--n_heads=2", "--hidden_size=32", "--inner_size=64", "--MAX_ITEM_LIST_LENGTH=10",
               "--epochs=2", "--show_progress=False", f"--checkpoint_dir={saved}", f"--resume_from={resume_file}")


@pytest.mark.slow
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
    resume = resume_run(data_root, tmp_path / "saved", crafted)
    assert resume.returncode == 2, resume.stderr[-2000:]
    assert "refusing to load" in resume.stderr and "Traceback" not in resume.stderr
    assert not sentinel.exists()


@pytest.mark.slow
def test_a_checkpoint_saved_on_cuda_loads_on_this_cpu(real_checkpoint, tmp_path):
    """Storages tagged as CUDA and a Config whose device is CUDA: mapped to the CPU, the device follows."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the checkpoint would load on the GPU")
    checkpoint = as_recbole_pth(real_checkpoint)
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
    for name, tensor in load_checkpoint(real_checkpoint)["state_dict"].items():
        assert torch.equal(loaded["state_dict"][name], tensor)
    evaluate = cli("evaluate", f"--checkpoint={cuda_tagged}")
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    assert "test result" in evaluate.stdout + evaluate.stderr
    export = cli("export", "--checkpoint", str(cuda_tagged), "--output", str(tmp_path / "artifact"))
    assert export.returncode == 0, export.stderr[-2000:]


@pytest.mark.slow
def test_a_checkpoint_cannot_point_recbole_at_a_pickle(real_checkpoint, tmp_path):
    """A crafted Config naming a saved dataset/dataloaders file (here a payload pickle) would make RecBole
    pickle.load it; and torch's legacy tar format lets a file start with a pickle. Both are refused."""
    sentinel = tmp_path / "sentinel"
    payload = tmp_path / "payload.pkl"
    payload.write_bytes(call_ops("posix.system", (f"touch {sentinel}",)).replace(b"cposix", b"\x80\x02cposix", 1)
                        + b".")
    checkpoint = as_recbole_pth(real_checkpoint)
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
    checkpoint = as_recbole_pth(real_checkpoint)
    checkpoint["config"].final_config_dict[key] = value
    crafted = tmp_path / "crafted.pth"
    torch.save(checkpoint, crafted)
    with pytest.raises(RecboleLLMError, match=f"refusing to load .*unsupported config: {key}"):
        load_checkpoint(crafted)


# ---------------------------------------------------------------------------------------------------------
# gadgets, generated: every admitted global as the outer call, a class it must never call in every argument
# position, nested to depth 64 through calls and containers


NEVER_CALLED = ["recbole.config.configurator.Config", "recbole_llm.model.bertrec.BERTRec",
                "yaml.loader.FullLoader", "recbole.utils.enum_type.ModelType", "builtins.object"]
POSITIONS = 4  # arguments per call: the dangerous one in each place, payload data in the others
DEPTH = 64


def global_ops(name: str) -> bytes:
    module, attr = name.rsplit(".", 1)
    return b"c" + module.encode() + b"\n" + attr.encode() + b"\n"


def data_ops(value) -> bytes:
    return pickle.dumps(value, protocol=0)[:-1]  # protocol 0: no PROTO/FRAME; drop STOP


def fillers(sentinel: Path) -> list[bytes]:
    """Payload data for each argument position: code, Config's constructor arguments, a config dict."""
    return [data_ops(code(sentinel)), data_ops(f"touch {sentinel}"),
            data_ops((None, None, None, {"payload": code(sentinel)})), data_ops({"payload": code(sentinel)})]


def call_with(function: str, inner: bytes, position: int, sentinel: Path) -> bytes:
    """``function(a0, a1, a2, a3)`` with ``inner`` as ``a<position>`` and payload data everywhere else."""
    arguments = [inner if i == position else filler for i, filler in enumerate(fillers(sentinel))]
    return global_ops(function) + pickle.MARK + b"".join(arguments) + pickle.TUPLE + pickle.REDUCE


def gadget(outer: str, never_called: str, position: int, nesting: str, sentinel: Path) -> bytes:
    """``outer`` called with ``never_called`` ``DEPTH`` levels down in argument ``position``.

    ``deferred``: the reported shape, calls the pickle never makes itself: each level is the tuple
    ``(outer, payload, <next level>, payload)``, so that a function calling its first argument with the
    rest (``_rebuild_from_type_v2(func, new_type, args, state)`` runs ``func(*args)``) walks down the levels
    at run time to ``(never_called, payload, Config's arguments, payload)``. ``call``: ``outer`` called
    by the pickle at every level. ``tuple``/``list``/``dict``: plain containers.
    """
    if nesting == "deferred":
        level = pickle.MARK + global_ops(never_called) + b"".join(fillers(sentinel)[1:]) + pickle.TUPLE
        for _ in range(DEPTH - 1):
            items = [global_ops(outer) if i == 0 else level if i == position else filler
                     for i, filler in enumerate(fillers(sentinel))]
            level = pickle.MARK + b"".join(items) + pickle.TUPLE
        return global_ops(outer) + level + pickle.REDUCE
    ops = global_ops(never_called)
    for _ in range(DEPTH - 1):
        if nesting == "call":
            ops = call_with(outer, ops, position, sentinel)
        elif nesting == "tuple":
            ops = pickle.MARK + ops + pickle.TUPLE
        elif nesting == "list":
            ops = pickle.MARK + ops + pickle.LIST
        else:
            ops = pickle.MARK + data_ops("key") + ops + pickle.DICT
    return call_with(outer, ops, position, sentinel)


def nestings(position: int) -> tuple[str, ...]:
    if position == 0:
        return ("call", "tuple", "list", "dict")
    return ("call", "deferred")


@pytest.fixture(scope="module")
def slim_pickle(real_checkpoint) -> tuple[dict, bytes]:
    """A small RecBole-format checkpoint (the real Config, one tensor) whose other_parameter is a marker:
    the zip's entries, with data.pkl's bytes apart, so that thousands of gadgets load in seconds."""
    import io

    checkpoint = as_recbole_pth(real_checkpoint)
    del checkpoint["config"].recbole_llm_world  # the id maps: most of the pickle, none of what is tested here
    slim = {"config": checkpoint["config"], "state_dict": {"w": torch.ones(2)}, "other_parameter": PLACEHOLDER}
    buffer = io.BytesIO()
    torch.save(slim, buffer, pickle_protocol=2)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source:
        entries = {entry.filename: source.read(entry) for entry in source.infolist()}
    (name,) = [n for n in entries if n.endswith("/data.pkl")]
    return entries, name


def planted_slim(slim_pickle, ops: bytes, target: Path) -> Path:
    entries, pickle_name = slim_pickle
    marker = b"X" + struct.pack("<I", len(PLACEHOLDER)) + PLACEHOLDER.encode()
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as out:
        for name, data in entries.items():
            out.writestr(name, data.replace(marker, ops) if name == pickle_name else data)
    return target


@pytest.mark.slow
def test_generated_gadgets_never_run_code_and_fail_in_one_line(slim_pickle, tmp_path):
    sentinel = tmp_path / "sentinel"
    names = sorted(allowed_globals())
    assert len(names) > 100
    target = tmp_path / "gadget.pth"
    loaded = 0
    for outer in names:
        for never_called in NEVER_CALLED:
            for position in range(POSITIONS):
                for nesting in nestings(position):
                    ops = gadget(outer, never_called, position, nesting, sentinel)
                    with pytest.raises(RecboleLLMError) as refused:
                        load_checkpoint(planted_slim(slim_pickle, ops, target))
                    assert "\n" not in str(refused.value), (outer, never_called, position, nesting)
                    assert not sentinel.exists(), f"code ran: {outer} <- {never_called} at {position} ({nesting})"
                    loaded += 1
    assert loaded == len(names) * len(NEVER_CALLED) * sum(len(nestings(p)) for p in range(POSITIONS))


def test_the_payload_of_the_reported_gadget_cannot_reach_config(slim_pickle, tmp_path):
    """The reported shape: _rebuild_from_type_v2 nested 64 deep with Config at the bottom; and Config's
    state, which the allow-list admits, cannot be called through any admitted function."""
    sentinel = tmp_path / "sentinel"
    for position in (1, 2, 3):
        ops = gadget("torch._tensor._rebuild_from_type_v2", "recbole.config.configurator.Config", position,
                     "deferred", sentinel)
        with pytest.raises(RecboleLLMError, match="refusing to load .*_rebuild_from_type_v2"):
            load_checkpoint(planted_slim(slim_pickle, ops, tmp_path / "reported.pth"))
        assert not sentinel.exists()


@pytest.mark.parametrize("value, fragment", [
    (["a", "list"], "other_parameter: a list, not a mapping"),
    ({"note": 1}, None),  # a plain name: allowed (RecBole sets it as an attribute)
    ({"forward": 1}, "other_parameter entry 'forward'"),  # would replace the model's method
    ({"__class__": 1}, "other_parameter entry '__class__'"),
    ({"hook": "CALLABLE"}, "other_parameter entry 'hook'"),
])
def test_other_parameter_is_plain_named_data(slim_pickle, tmp_path, value, fragment):
    ops = data_ops(value)
    if value == {"hook": "CALLABLE"}:  # an admitted callable as a value, which RecBole would set on the model
        ops = pickle.MARK + data_ops("hook") + global_ops("collections.OrderedDict") + pickle.DICT
    crafted = planted_slim(slim_pickle, ops, tmp_path / "other.pth")
    if fragment is None:
        assert load_checkpoint(crafted)["other_parameter"] == value
        return
    with pytest.raises(RecboleLLMError, match=f"refusing to load .*{fragment}"):
        load_checkpoint(crafted)


# ---------------------------------------------------------------------------------------------------------
# the plugin's own format: no pickle, and damaged files fail in one line


def test_the_plugin_saves_checkpoints_without_pickle(real_checkpoint):
    from safetensors import safe_open

    from recbole_llm.checkpoint.format import FORMAT_KEY, is_pickle_free

    for path in real_checkpoint.parent.glob("*.pth"):  # the best model and the -latest file
        assert is_pickle_free(path) and not zipfile.is_zipfile(path)
        with safe_open(str(path), framework="pt") as f:
            assert FORMAT_KEY in f.metadata() and any(k.startswith("state_dict/") for k in f.keys())
        assert b"recbole.config.configurator" not in path.read_bytes()


def test_old_and_new_formats_load_to_the_same_checkpoint(real_checkpoint, tmp_path):
    """A RecBole-format (pickle) copy and the plugin's own file: the same weights, config and state."""
    new = load_checkpoint(real_checkpoint)
    old_path = real_checkpoint.parent / "as-recbole.pth"
    torch.save(new, old_path, pickle_protocol=4)  # what RecBole's trainer (and the previous release) write
    try:
        old = load_checkpoint(old_path)
    finally:
        old_path.unlink()
    assert old.keys() == new.keys()
    assert old["config"].__dict__.keys() == new["config"].__dict__.keys()
    assert old["config"].final_config_dict == new["config"].final_config_dict
    assert old["config"].model_class is new["config"].model_class
    assert all(torch.equal(old["state_dict"][k], new["state_dict"][k]) for k in new["state_dict"])


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "json", "tag", "version", "tensor", "deep", "model_class"])
def test_a_damaged_pickle_free_checkpoint_fails_in_one_line(real_checkpoint, tmp_path, damage):
    import json

    from safetensors.torch import load_file, save_file

    from recbole_llm.checkpoint.format import FORMAT_KEY

    from safetensors import safe_open

    with safe_open(str(real_checkpoint), framework="pt") as f:
        header = json.loads(f.metadata()[FORMAT_KEY])
    tensors = load_file(str(real_checkpoint))
    crafted = tmp_path / "damaged.pth"
    if damage == "truncate":
        crafted.write_bytes(real_checkpoint.read_bytes()[:5000])
    else:
        if damage == "json":
            text = "{not json"
        else:
            if damage == "tag":
                header["checkpoint"]["epoch"] = {"__eval__": "__import__('os')"}
            elif damage == "version":
                header["version"] = 99
            elif damage == "tensor":
                header["checkpoint"]["cur_step"] = {"__tensor__": "no/such/tensor"}
            elif damage == "deep":
                deep = 0
                for _ in range(100_000):
                    deep = [deep]
                header["checkpoint"]["other_parameter"] = {"x": deep}
            elif damage == "model_class":
                header["checkpoint"]["config"]["model_class"] = "os:system"
            text = json.dumps(header) if damage != "deep" else None
            if text is None:  # json.dumps itself recurses: build the nesting as text
                header["checkpoint"]["other_parameter"] = "DEEP"
                text = json.dumps(header).replace('"DEEP"', '{"x": ' + "[" * 100_000 + "0" + "]" * 100_000 + "}")
        save_file(tensors, str(crafted), metadata={FORMAT_KEY: text})
    with pytest.raises(RecboleLLMError, match="is not a RecBole checkpoint|refusing to load") as refused:
        load_checkpoint(crafted)
    assert "\n" not in str(refused.value)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["tensor", "value", "key"])
def test_a_checkpoint_changed_after_saving_is_refused(real_checkpoint, tmp_path, where):
    """A change that still parses (one bit of a weight, one digit of a counter) would load as another model; one
    that breaks a field's name is called damaged too, not "not a checkpoint"."""
    data = bytearray(real_checkpoint.read_bytes())
    at = data.index(b'epoch\\": ')  # the JSON sits escaped in safetensors' header
    if where == "tensor":
        data[-1] ^= 0x01  # the data section ends the file: a bit of the last tensor
    elif where == "value":
        at += len(b'epoch\\": ')
        data[at:at + 1] = b"7" if data[at:at + 1] != b"7" else b"6"
    else:
        data[at + 4:at + 5] = b"H"  # "epocH": a field no trainer writes
    changed = tmp_path / "changed.pth"
    changed.write_bytes(bytes(data))
    with pytest.raises(RecboleLLMError, match="is damaged: its contents do not match the SHA-256") as refused:
        load_checkpoint(changed)
    assert "\n" not in str(refused.value)


# ---------------------------------------------------------------------------------------------------------
# a checkpoint's settings decide nothing about where files are written


@pytest.mark.slow
def test_a_checkpoint_config_cannot_choose_where_evaluate_and_export_write(real_checkpoint, tmp_path):
    checkpoint = as_recbole_pth(real_checkpoint)
    elsewhere = tmp_path / "elsewhere"
    checkpoint["config"].final_config_dict.update(
        save_dataset=True, save_dataloaders=True, checkpoint_dir=str(elsewhere / "saved"), log_wandb=True,
        allow_download=True)
    folder = tmp_path / "downloaded"
    folder.mkdir()
    crafted = folder / "crafted.pth"
    torch.save(checkpoint, crafted)
    work = tmp_path / "work"
    work.mkdir()
    for args in (["evaluate", f"--checkpoint={crafted}"],
                 ["export", "--checkpoint", str(crafted), "--output", str(tmp_path / "artifact")]):
        result = subprocess.run([sys.executable, "-m", "recbole_llm", *args], capture_output=True, text=True,
                                timeout=300, cwd=work, stdin=subprocess.DEVNULL,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
        assert result.returncode == 0, result.stderr[-2000:]
    assert not elsewhere.exists()
    assert sorted(p.name for p in folder.iterdir()) == ["crafted.pth"]  # nothing saved beside it either
    assert not (work / "saved").exists()
    loaded = load_checkpoint(crafted)
    assert not loaded["config"]["save_dataset"] and not loaded["config"]["save_dataloaders"]
    assert not loaded["config"]["allow_download"] and not loaded["config"]["log_wandb"]
    # named on the command line, the user's own folder is used
    from recbole_llm.checkpoint.overrides import config_overrides

    with config_overrides({"checkpoint_dir": str(tmp_path / "mine")}):
        assert load_checkpoint(crafted)["config"]["checkpoint_dir"] == str(tmp_path / "mine")


@pytest.mark.slow
def test_a_checkpoint_saved_by_the_previous_release_loads_and_exports_with_identical_scores(real_checkpoint, tmp_path):
    """The previous release's trainer wrote ``torch.save(state, f, pickle_protocol=4)``: such a file still
    loads (through the allow-list) and exports to an artifact that answers exactly as the new format's."""
    import json

    from recbole_llm.export import ExportOptions, export_checkpoint
    from recbole_llm.serving.runtime import Recommender

    previous = tmp_path / "previous.pth"
    torch.save(as_recbole_pth(real_checkpoint), previous, pickle_protocol=4)
    assert zipfile.is_zipfile(previous)
    answers = []
    for name, checkpoint in (("previous", previous), ("current", real_checkpoint)):
        artifact = export_checkpoint(str(checkpoint), tmp_path / name, ExportOptions(top_k=20)).path
        tokens = json.loads((artifact / "metadata.json").read_text())["item_tokens"][1:]
        histories = [tokens[i:i + 7] for i in range(0, 140, 7)]
        answers.append([(r.items, r.scores) for r in Recommender(artifact).recommend(histories, k=20)])
    assert answers[0] == answers[1]


# ---------------------------------------------------------------------------------------------------------
# found by a hostile review: values that would hang, fetch, overwrite or silently change what is loaded


def _doubling(depth: int) -> list:
    value = [1]
    for _ in range(depth):
        value = [value, value]  # pickled once per level (memo): printed, 2**depth
    return value


CRAFTED_CONFIG = {
    "shared references": ({"junk": _doubling(60)}, "shared references that would print without end"),
    "many keys": ({f"k{i}": 0 for i in range(10_001)}, "more than 10000 keys"),
    "a hub encoder": ({"pretrained_model_name_or_path": "attacker-org/evil-model"},
                      "never makes recbole_llm download"),
    "a seed that is not a number": ({"seed": "abc"}, "seed"),
    "a string device": ({"device": "cuda:7"}, "MODEL_TYPE, device or state"),
    "a history of 10**9": ({"MAX_ITEM_LIST_LENGTH": 10**9}, "MAX_ITEM_LIST_LENGTH"),
}


@pytest.mark.parametrize("case", list(CRAFTED_CONFIG))
def test_a_crafted_config_value_is_refused_in_one_line(real_checkpoint, tmp_path, case):
    values, fragment = CRAFTED_CONFIG[case]
    checkpoint = as_recbole_pth(real_checkpoint)
    checkpoint["config"].final_config_dict.update(values)
    crafted = tmp_path / "crafted.pth"
    torch.save(checkpoint, crafted, pickle_protocol=4)
    with pytest.raises(RecboleLLMError, match=fragment) as refused:
        load_checkpoint(crafted)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("field, value", [("epoch", -10**9), ("cur_step", "x"), ("global_step", 10**15),
                                          ("best_valid_score", "high")])
def test_a_checkpoint_with_counters_no_trainer_writes_is_refused(real_checkpoint, tmp_path, field, value):
    checkpoint = as_recbole_pth(real_checkpoint)
    checkpoint[field] = value
    crafted = tmp_path / "counters.pth"
    torch.save(checkpoint, crafted)
    with pytest.raises(RecboleLLMError, match=f"refusing to load .*unsupported {field}"):
        load_checkpoint(crafted)


@pytest.mark.parametrize("payload", ["bytearray", "hooks", "sparse", "numpy shape"])
def test_rebuilds_that_allocate_or_keep_hooks_are_refused(slim_pickle, tmp_path, payload):
    if payload == "bytearray":  # bytearray(2**36) would fill 64 GB before any check
        ops = global_ops("builtins.bytearray") + data_ops((2**36,)) + pickle.REDUCE
    elif payload == "hooks":  # a tensor whose backward hooks a backward pass would call
        ops = (global_ops("torch._utils._rebuild_tensor_v2") + pickle.MARK + data_ops(None) + data_ops(0)
               + data_ops((0,)) + data_ops((1,)) + data_ops(False)
               + pickle.MARK + data_ops(0) + global_ops("collections.Counter") + pickle.DICT
               + pickle.TUPLE + pickle.REDUCE)
    elif payload == "sparse":
        ops = (global_ops("torch._utils._rebuild_sparse_tensor") + data_ops((None, None)) + pickle.REDUCE)
    else:  # numpy's _reconstruct asked for 2**36 bytes up front
        ops = (global_ops("numpy.core.multiarray._reconstruct") + pickle.MARK + global_ops("numpy.ndarray")
               + data_ops((2**36,)) + data_ops(b"b") + pickle.TUPLE + pickle.REDUCE)
    with pytest.raises(RecboleLLMError, match="refusing to load") as refused:
        load_checkpoint(planted_slim(slim_pickle, ops, tmp_path / "alloc.pth"))
    assert "\n" not in str(refused.value)


@pytest.mark.slow
def test_other_parameter_cannot_set_what_the_model_does_not_keep(real_checkpoint, tmp_path):
    """max_seq_length is an instance attribute: set from a checkpoint it would silently score 5-item windows."""
    from recbole.quick_start import load_data_and_model

    checkpoint = as_recbole_pth(real_checkpoint)
    checkpoint["other_parameter"] = {"max_seq_length": 5}
    crafted = tmp_path / "other.pth"
    torch.save(checkpoint, crafted)
    with pytest.raises(RecboleLLMError, match=r"other_parameter \['max_seq_length'\]: BERTRec keeps none"):
        load_data_and_model(str(crafted))


@pytest.mark.slow
def test_a_resumed_latest_file_writes_its_best_model_by_its_own_name(real_checkpoint, data_root, tmp_path):
    """best_model_file inside a -latest.pth named a file beside it: the resumed run would overwrite it."""
    (latest,) = real_checkpoint.parent.glob("*-latest.pth")
    state = load_checkpoint(latest)
    folder = tmp_path / "downloaded"
    folder.mkdir()
    victim = folder / "VICTIM.txt"
    victim.write_text("the user's file")
    state["best_model_file"] = str(victim)
    from recbole_llm.checkpoint.format import atomic_save

    atomic_save(state, folder / "run-latest.pth")
    resumed = resume_run(data_root, tmp_path / "saved", folder / "run-latest.pth")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert victim.read_text() == "the user's file"
    assert (folder / "run.pth").is_file()
