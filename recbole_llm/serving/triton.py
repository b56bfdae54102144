"""Triton Inference Server over an exported artifact: ``recbole-llm serve ARTIFACT --engine triton``.

The nvidia-pytriton wheel (``pip install "recbole_llm[triton]"``) carries a real ``tritonserver``, Triton's
Python backend and a backend stub built for each Python version; they need neither Docker nor a GPU. We use
those files, not PyTriton's ``bind`` proxy (which answers errors per model call, so one bad request failed
every request batched with it, and cannot mark an input ragged). At start this module:

1. checks the ports, and loads the artifact here (:class:`~recbole_llm.serving.runtime.Recommender`), so that a
   bad one is one line before anything starts; the copy is dropped again;
2. writes, into a temporary folder removed at exit, a backend folder (``backends/python``: links to the wheel's
   ``libtriton_python.so``, ``triton_python_backend_utils.py`` and the stub for this interpreter's version,
   as PyTriton 0.7 lays them out) and a model repository: ``recommend/config.pbtxt`` (the Python backend,
   dynamic batching, ``histories`` ragged, the artifact and options as ``parameters``) and
   ``recommend/1/model.py``, which hands Triton's utilities to
   :class:`~recbole_llm.serving.triton_model.RecommendModel` (the model and its tensors are described there);
3. runs ``tritonserver`` as a child process (its own session, SIGTERM'd by the kernel if this process dies),
   waits for ``/v2/health/ready`` (the model loaded: strict readiness), forwards SIGTERM and SIGINT to it
   (Triton drains for up to ``--shutdown-timeout`` seconds) and returns its exit status.

The stub is an embedded interpreter that finds its standard library and site-packages by looking for
``python3`` on ``PATH``, and loads ``libpython`` by name: :func:`server_environment` puts this interpreter's
``bin`` first on ``PATH`` (as PyTriton does), its own libpython folder first on ``LD_LIBRARY_PATH`` (an
interpreter built outside the system, pyenv or a source build, would otherwise get the system's library of
another patch release and fail with ``'_thread.RLock' object has no attribute '_recursion_count'``), the
wheel's bundled libraries last on it, and the folder this ``recbole_llm`` was imported from first on
``PYTHONPATH``, so the stub runs the same package.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import re
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from recbole_llm.errors import RecboleLLMError, first_line
from recbole_llm.serving.requests import Limits
from recbole_llm.serving.runtime import UNKNOWN_TOKEN_POLICIES, Recommender
from recbole_llm.serving.server import check_can_listen

MODEL_NAME = "recommend"  # the model's name in Triton (its folder in the repository)
# folders the dynamic loader searches without being told: a libpython there is the one the stub finds anyway
SYSTEM_LIBRARY_FOLDERS = {"/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib"}
INSTALL = "pip install 'recbole_llm[triton]' (nvidia-pytriton: Linux x86_64 or arm64 with glibc 2.35 or newer)"
READY_TIMEOUT = 300.0  # seconds for Triton to start and load the model (the stub loads the artifact again)
LOG_LINES = 200  # Triton's last log lines kept, for the one-line error when it fails
# the Python backend's shared memory per model instance, as PyTriton 0.7 sets it (the backend's 64 MB default
# does not fit Docker's default /dev/shm); it grows by the second figure when a request needs more
SHM_DEFAULT_BYTES, SHM_GROWTH_BYTES = 4 << 20, 1 << 20
PR_SET_PDEATHSIG = 1  # linux/prctl.h

MODEL_FILE = '''"""Written by recbole-llm serve --engine triton: Triton's Python backend loads this file in its stub."""
import triton_python_backend_utils

from recbole_llm.serving.triton_model import RecommendModel


class TritonPythonModel(RecommendModel):
    utils = triton_python_backend_utils
'''


@dataclass(frozen=True)
class TritonFiles:
    """What the nvidia-pytriton wheel ships and a server needs."""

    server: Path  # tritonserver
    backend: Path  # the Python backend's folder: libtriton_python.so, triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub built for this interpreter's Python version
    libraries: Path  # the shared libraries tritonserver links against (nvidia_pytriton.libs)


def triton_files() -> TritonFiles:
    """Locate the wheel's files with PyTriton's own helpers (their layout is PyTriton 0.7's). Raises
    RecboleLLMError in one line, naming the install, where PyTriton cannot be imported or a file is missing
    (a Python version the wheel has no stub for)."""
    try:
        from pytriton.utils.distribution import get_libs_path, get_root_module_path, get_stub_path
    except ImportError as error:
        raise RecboleLLMError(f"--engine triton needs PyTriton ({first_line(error)}): {INSTALL}") from None
    root = get_root_module_path() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    files = TritonFiles(server=root / "bin" / "tritonserver", backend=root / "backends" / "python",
                        stub=Path(get_stub_path(version)), libraries=Path(get_libs_path()))
    for path in (files.server, files.backend / "libtriton_python.so", files.stub, files.libraries):
        if not path.exists():
            raise RecboleLLMError(f"PyTriton's {path.name} is missing ({path}); this nvidia-pytriton has no Triton "
                                  f"for Python {version} here: {INSTALL}")
    return files


def python_library_folder() -> str | None:
    """The folder of this interpreter's shared libpython where the dynamic loader would not find it by itself
    (pyenv, a source build, conda); None for a system interpreter or one without a shared libpython."""
    folder, name = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if not (sysconfig.get_config_var("Py_ENABLE_SHARED") and folder and name):
        return None
    multiarch = sysconfig.get_config_var("MULTIARCH")
    system = SYSTEM_LIBRARY_FOLDERS | ({f"/lib/{multiarch}", f"/usr/lib/{multiarch}"} if multiarch else set())
    if os.path.realpath(folder) in {os.path.realpath(path) for path in system}:
        return None
    return folder if os.path.isfile(os.path.join(folder, name)) else None


def _first_on(value: str | None, first: str | None, last: str | None = None) -> str:
    """A ``os.pathsep`` list with ``first`` at its head and ``last`` at its tail, each once."""
    paths = [path for path in (value or "").split(os.pathsep) if path and path not in (first, last)]
    return os.pathsep.join([*([first] if first else []), *paths, *([last] if last else [])])


def server_environment(environ: Mapping[str, str], libraries: str | Path) -> dict[str, str]:
    """tritonserver's environment (its stub inherits it): ``environ`` with this interpreter's libpython folder
    (:func:`python_library_folder`, where needed) first and ``libraries`` (the wheel's) last on
    ``LD_LIBRARY_PATH``, this interpreter's ``bin`` first on ``PATH``, and the folder holding this
    ``recbole_llm`` first on ``PYTHONPATH``."""
    package_folder = str(Path(__file__).resolve().parents[2])  # recbole_llm/serving/triton.py
    env = dict(environ)
    env["LD_LIBRARY_PATH"] = _first_on(env.get("LD_LIBRARY_PATH"), python_library_folder(), str(libraries))
    env["PATH"] = _first_on(env.get("PATH"), str(Path(sys.exec_prefix) / "bin"))
    env["PYTHONPATH"] = _first_on(env.get("PYTHONPATH"), package_folder)
    return env


def pbtxt_string(text: str) -> str:
    """``text`` as a protobuf text-format string literal: UTF-8, every byte outside printable ASCII (and the
    quote and backslash) as an octal escape."""
    return '"' + "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\{b:03o}"
                         for b in text.encode("utf-8")) + '"'


def model_config(max_batch: int, parameters: Mapping[str, str]) -> str:
    """config.pbtxt of the model ``recommend``: Triton's Python backend, one CPU instance, dynamic batching
    with no added delay (requests waiting when the model is free share a call, as in the HTTP service), at
    most ``max_batch`` rows per request and per call; ``histories`` ragged, so requests of different widths
    share calls; ``parameters`` as string parameters."""
    entries = ",\n".join(f"  {{ key: {pbtxt_string(key)} value: {{ string_value: {pbtxt_string(value)} }} }}"
                         for key, value in parameters.items())
    return f"""name: "{MODEL_NAME}"
backend: "python"
max_batch_size: {max_batch}
dynamic_batching {{ max_queue_delay_microseconds: 0 }}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
input [
  {{ name: "histories" data_type: TYPE_STRING dims: [ -1 ] allow_ragged_batch: true }},
  {{ name: "k" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "exclude_seen" data_type: TYPE_BOOL dims: [ 1 ] optional: true }}
]
output [
  {{ name: "items" data_type: TYPE_STRING dims: [ -1 ] }},
  {{ name: "scores" data_type: TYPE_FP32 dims: [ -1 ] }},
  {{ name: "unknown_tokens" data_type: TYPE_INT32 dims: [ 1 ] }}
]
parameters [
{entries}
]
"""


def write_repository(folder: Path, files: TritonFiles, config: str, model_file: str = MODEL_FILE) -> None:
    """``folder/backends/python`` (links to the wheel's backend and this Python's stub, the layout the backend
    expects: it runs the stub found beside libtriton_python.so) and ``folder/models/recommend``
    (``config.pbtxt``, ``1/model.py``)."""
    backend = folder / "backends" / "python"
    backend.mkdir(parents=True)
    for source in (*files.backend.iterdir(), files.stub):
        if source.is_file():
            (backend / source.name).symlink_to(source)
    model = folder / "models" / MODEL_NAME
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(config, encoding="utf-8")
    (model / "1" / "model.py").write_text(model_file, encoding="utf-8")


def triton_command(files: TritonFiles, folder: Path, host: str, ports: Mapping[str, int],
                   exit_timeout: int) -> list[str]:
    """tritonserver's command line over :func:`write_repository`'s ``folder``: the model loaded at start
    (a model that fails to load stops the server), its config taken as written (no auto-complete), every
    endpoint on ``host``, Triton's info log off (warnings and errors kept)."""
    prefix = shm_prefix()  # the backend adds its own unique suffix
    return [str(files.server), f"--model-repository={folder / 'models'}",
            f"--backend-directory={folder / 'backends'}", "--model-control-mode=none", "--strict-readiness=true",
            "--exit-on-error=true", "--disable-auto-complete-config", f"--exit-timeout-secs={exit_timeout}",
            f"--http-address={host}", f"--http-port={ports['http']}", f"--grpc-address={host}",
            f"--grpc-port={ports['grpc']}", f"--metrics-address={host}", f"--metrics-port={ports['metrics']}",
            "--allow-gpu-metrics=false", "--log-verbose=0", "--log-info=false",
            f"--backend-config=python,shm-region-prefix-name={prefix}",
            f"--backend-config=python,shm-default-byte-size={SHM_DEFAULT_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={SHM_GROWTH_BYTES}"]


def triton_error(lines: list[str]) -> str:
    """The one line that says why Triton failed, from its log: the model's load error (the exception the
    stub raised, without its traceback), else Triton's last ``error:`` line, else its last error entry."""
    for line in lines:
        found = re.search(r"failed to load '[^']*' version \d+: (?:\w+: )?(.*)", line)
        if found:
            return found.group(1).split("\\n")[0].rstrip('"').strip()
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1][len("error:"):].strip()
    entries = [re.sub(r"^E\d{4} [^\]]*\] ", "", line).strip('"') for line in lines if re.match(r"E\d{4} ", line)]
    return entries[-1].split("\\n")[0] if entries else "no error in its log"


class TritonLog:
    """Reads tritonserver's output (stdout and stderr, one pipe) on a thread: keeps the last lines, and once
    ``forward`` is set echoes Triton's error entries to this process's stderr."""

    def __init__(self, stream):
        self.lines: deque[str] = deque(maxlen=LOG_LINES)
        self.forward = False
        self.thread = threading.Thread(target=self._read, args=(stream,), name="triton-log", daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))
            if self.forward and re.match(r"E\d{4} ", line):
                print(f"recbole-llm serve: Triton: {line.rstrip()}", file=sys.stderr, flush=True)

    def error(self) -> str:
        self.thread.join(timeout=5)  # the process is gone: read to the pipe's end
        return triton_error(list(self.lines))


def _die_with(parent: int) -> Callable[[], None]:
    """preexec_fn for tritonserver: the kernel sends it SIGTERM when ``parent`` (this process) dies, however."""
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork

    def arrange() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took hold
            os._exit(1)

    return arrange


def _local(host: str) -> str:
    """Where this process reaches a server listening on ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if ":" in host:
        return "[::1]" if host == "::" else f"[{host}]"
    return host


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def shm_prefix(pid: int | None = None) -> str:
    """The shared-memory region prefix of this process's Triton (its stubs carry it on their command line)."""
    return f"recbole_llm_{os.getpid() if pid is None else pid}_"


def remove_leftovers(prefix: str) -> int:
    """Kill the Python-backend stubs whose command line names shared memory ``prefix`` and remove its regions;
    returns how many stubs were killed. Triton stopping past its exit timeout (requests still running) can leave
    a stub behind, reparented to init and deaf to SIGTERM, holding its model and region."""
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if any(argument.startswith(prefix.encode()) for argument in arguments[1:]):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    for region in Path("/dev/shm").glob(prefix + "*"):
        region.unlink(missing_ok=True)
    return killed


def run_triton(files: TritonFiles, folder: Path, host: str, ports: Mapping[str, int], exit_timeout: int,
               on_ready: Callable[[], None] = lambda: None) -> int:
    """Run tritonserver over ``folder`` (:func:`write_repository`) until SIGTERM or SIGINT, which are forwarded
    to it; returns its exit status (0: it drained and stopped cleanly; 128 + n if signal n killed it). Raises
    RecboleLLMError in one line, with tritonserver stopped, where it exits by itself (a model that fails to
    load, a port taken meanwhile) or is not ready within READY_TIMEOUT seconds."""
    stop = threading.Event()
    process: subprocess.Popen | None = None

    def forward(number, frame) -> None:
        stop.set()
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)  # Triton stops the same way on either signal

    handlers = {number: signal.signal(number, forward) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        process = subprocess.Popen(
            triton_command(files, folder, host, ports, exit_timeout), env=server_environment(os.environ,
                                                                                             files.libraries),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace", start_new_session=True, preexec_fn=_die_with(os.getpid()))
        log = TritonLog(process.stdout)
        if stop.is_set():  # a signal came while it started
            process.send_signal(signal.SIGTERM)
        url = f"http://{_local(host)}:{ports['http']}/v2/health/ready"
        deadline = time.monotonic() + READY_TIMEOUT
        while not stop.is_set() and process.poll() is None and not _ready(url):
            if time.monotonic() > deadline:
                raise RecboleLLMError(f"Triton was not ready within {READY_TIMEOUT:.0f} s; its last error: "
                                      f"{log.error()}")
            time.sleep(0.2)
        if not stop.is_set():
            if process.poll() is not None:
                raise RecboleLLMError(f"Triton did not start (status {process.returncode}): {log.error()}")
            log.forward = True
            on_ready()
        status = process.wait()
        if not stop.is_set():
            raise RecboleLLMError(f"Triton stopped by itself (status {status}): {log.error()}; start it again")
        return status if status >= 0 else 128 - status
    finally:
        if process is not None and process.poll() is None:  # an error on our side: never leave it running
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=exit_timeout + 5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process is not None and remove_leftovers(shm_prefix()):
            print("recbole-llm serve: a Triton Python-backend stub outlived the server (stopped past "
                  "--shutdown-timeout); killed", file=sys.stderr, flush=True)
        for number, handler in handlers.items():
            signal.signal(number, handler)


def check_ports(host: str, ports: dict[str, int]) -> None:
    """Each of ``ports`` ({option: port}) a TCP port, no two alike, and free on ``host``; RecboleLLMError."""
    for option, port in ports.items():
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise RecboleLLMError(f"{option} {port!r} is not a TCP port; use 1 to 65535")
    options = list(ports)
    for index, option in enumerate(options):
        for other in options[index + 1 :]:
            if ports[option] == ports[other]:
                raise RecboleLLMError(f"{option} and {other} are both {ports[option]}; Triton needs a port for each")
    for option, port in ports.items():
        try:
            check_can_listen(host, port)
        except RecboleLLMError as error:  # it names --port, the FastAPI service's only one
            raise RecboleLLMError(str(error).replace("another --port", f"another {option}")) from None


def serve_triton(
    artifact: str | Path,
    host: str = "127.0.0.1",
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    limits: Limits | None = None,
    unknown_tokens: str = "skip",
    intra_op_threads: int | None = None,
    retrieval: str = "exact",
) -> int:
    """Serve ``artifact`` with Triton until SIGTERM or SIGINT (then Triton drains for up to
    ``limits.shutdown_timeout`` seconds and stops); returns tritonserver's exit status, 0 on a clean stop.
    Raises RecboleLLMError in one line, with nothing left running, for missing PyTriton, a port that is taken
    or given twice, an artifact that does not load (here, or in Triton), or a server that does not start or
    stops by itself."""
    limits = limits or Limits()
    limits.check()
    if unknown_tokens not in UNKNOWN_TOKEN_POLICIES:
        raise RecboleLLMError(f"--unknown-tokens '{unknown_tokens}' is not a policy; use skip or error")
    files = triton_files()
    check_ports(host, {"--port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port})
    artifact = Path(artifact).resolve()
    recommender = Recommender(artifact, unknown_tokens=unknown_tokens, intra_op_threads=intra_op_threads,
                              retrieval=retrieval)  # a bad artifact fails here, in one line, before Triton starts
    providers = ", ".join(recommender.session.get_providers())
    del recommender  # Triton's stub loads its own
    gc.collect()
    parameters = {"artifact": str(artifact), "unknown_tokens": unknown_tokens,
                  "intra_op_threads": "" if intra_op_threads is None else str(intra_op_threads),
                  "retrieval": retrieval, "max_batch": str(limits.max_batch), "max_history": str(limits.max_history)}

    def announce() -> None:
        print(f"recbole-llm serve: {artifact} on Triton as model '{MODEL_NAME}' ({providers}): HTTP {host}:{http_port}, "
              f"gRPC {host}:{grpc_port}, metrics http://{host}:{metrics_port}/metrics; SIGINT or SIGTERM stops it",
              file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="recbole-llm-triton-") as folder:
        write_repository(Path(folder), files, model_config(limits.max_batch, parameters))
        return run_triton(files, Path(folder), host, {"http": http_port, "grpc": grpc_port, "metrics": metrics_port},
                          max(1, math.ceil(limits.shutdown_timeout)), announce)
