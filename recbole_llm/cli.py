"""The ``recbole-llm`` command line, with RecBole's ``--key=value`` conventions.

    recbole-llm run --model=BERTRec --dataset=ml-100k [--config_files="a.yaml b.yaml"] [--key=value ...]
    recbole-llm evaluate --checkpoint=saved/BERTRec-....pth [--data_path=DIR] [--key=value ...]
    recbole-llm export --checkpoint saved/BERTRec-....pth --output DIR [--top-k K] [--optimize] [--int8] ...
                       [--data_path=DIR] [--key=value ...]
    recbole-llm add-items DIR items.tsv [--output DIR2]
    recbole-llm serve DIR [--host 127.0.0.1] [--port 8000] [--unknown-tokens skip|error] ...
    recbole-llm serve DIR --engine triton [--port 8000] [--grpc-port 8001] [--metrics-port 8002] ...
    recbole-llm models

``run`` is RecBole's own ``run_recbole``: every ``--key=value`` goes to RecBole's ``Config`` exactly as
it does with RecBole's ``run_recbole.py``, with the same precedence (command line > config_dict > config
files > model YAML > RecBole defaults).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import time
from typing import Sequence

USAGE = """usage: recbole-llm COMMAND [--key=value ...]

commands:
  run      train and test a model with RecBole's run_recbole
           recbole-llm run --model=BERTRec --dataset=ml-100k [--config_files="a.yaml b.yaml"] [--key=value ...]
  evaluate test a saved RecBole checkpoint (loaded safely, with RecBole's load_data_and_model)
           recbole-llm evaluate --checkpoint=saved/BERTRec-Nov-28-2026_09-00-00.pth [--data_path=DIR] [--key=value ...]
  export   turn a checkpoint into a validated ONNX artifact for ONNX Runtime or Triton
           recbole-llm export --checkpoint saved/X.pth --output DIR [--top-k K] [--opset 17]
               [--optimize] [--int8 | --fp16] [--triton] [--item-index] [--force] [--data_path=DIR] [--key=value ...]
  add-items  add items to an artifact exported with --item-index, from their text (written atomically)
           recbole-llm add-items DIR items.tsv [--output DIR2]
  serve    an HTTP JSON service over an exported artifact (needs: pip install "recbole_llm[serve]")
           recbole-llm serve DIR [--host 127.0.0.1] [--port 8000] [--unknown-tokens skip|error]
               [--max-batch 256] [--max-history 10000] [--max-body-bytes 1048576] [--no-batching]
               [--max-explained 256] [--threads N] [--body-timeout 10] [--keep-alive-timeout 5]
               [--shutdown-timeout 10] [--allow-item-updates] [--max-new-items 1000] [--retrieval exact|ann]
           recbole-llm serve DIR --engine triton [--port 8000] [--grpc-port 8001] [--metrics-port 8002]
               (Triton Inference Server from PyTriton's wheel; needs: pip install "recbole_llm[triton]")
  models   list the models 'run' accepts (the plugin's, then RecBole's)

'serve' and 'add-items' run in a serving install (export/requirements-serve.txt: no torch, no RecBole); the
other commands need the full install. 'recbole-llm COMMAND --help' describes each.
"""


TRAINING_PACKAGES = ("torch", "recbole", "transformers", "peft", "onnx")  # what run/evaluate/export/models import
OVERRIDES_HELP = ("--key=value (or --key value): settings for the checkpoint's config, e.g. --data_path=DIR for "
                  "data moved since training, --eval_batch_size=256")


def _fail(message: str) -> int:
    print(f"recbole-llm: error: {message}", file=sys.stderr)
    return 2


def _parser(prog: str, **kwargs) -> argparse.ArgumentParser:
    """argparse, with its usage errors as one line and exit status 2 like every other error here."""
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False, **kwargs)
    parser.error = lambda message: sys.exit(_fail(f"{message} (see: {prog} --help)"))
    return parser


def _run(args: Sequence[str]) -> int:
    parser = _parser("recbole-llm run", epilog="--key=value: any RecBole or plugin setting, e.g. --epochs=2")
    parser.add_argument("--model", "-m", default="BERTRec", help="model name (default: BERTRec)")
    parser.add_argument("--dataset", "-d", default="ml-100k", help="dataset name (default: ml-100k)")
    parser.add_argument("--config_files", default=None, help="space-separated YAML config files")
    # RecBole's run_recbole.py launch options for distributed training (recbole.quick_start.run)
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine (default 1)")
    parser.add_argument("--world_size", type=int, default=-1, help="processes on all machines (default: nproc)")
    parser.add_argument("--ip", default="localhost", help="address of the rank-0 machine")
    parser.add_argument("--port", default="5678", help="free port on the rank-0 machine")
    parser.add_argument("--group_offset", type=int, default=0, help="rank of this machine's first process")
    known, rest = parser.parse_known_args(args)
    malformed = [arg for arg in rest if not arg.startswith("--") or "=" not in arg]
    if malformed:
        return _fail(f"cannot read {malformed[0]!r}: pass settings as --key=value")
    keys = [arg[2:].split("=", 1)[0] for arg in rest]
    twice = next((key for key in keys if keys.count(key) > 1), None)
    if twice:
        return _fail(f"--{twice} is given twice: keep one")
    config_files = known.config_files.split() if known.config_files else None
    for path in config_files or []:
        if not os.path.isfile(path):
            return _fail(f"config file '{path}' does not exist: check --config_files")

    if known.nproc < 1:
        return _fail(f"--nproc={known.nproc} must be at least 1")

    from recbole.quick_start import run  # this package is imported: importing RecBole installs the plugin

    from recbole_llm.errors import RecboleLLMError

    # RecBole's Config reads --key=value pairs from sys.argv itself (spawned ranks inherit sys.argv).
    sys.argv = [sys.argv[0], *rest]
    try:
        run(known.model, known.dataset, config_file_list=config_files, nproc=known.nproc,
            world_size=known.world_size, ip=known.ip, port=known.port, group_offset=known.group_offset)
    except RecboleLLMError as error:
        return _fail(str(error))
    return 0


def _overrides(rest: Sequence[str]) -> dict | int:
    """``--key=value`` settings for a checkpoint's Config (evaluate, export), or the exit code of a refusal."""
    overrides = {}
    args = list(rest)
    while args:
        arg = args.pop(0)
        key, equals, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if key and not equals and args and not args[0].startswith("--"):
            value, equals = args.pop(0), "="  # --key value
        if not key or not equals:
            return _fail(f"cannot read {arg!r}: pass settings for the checkpoint's config as --key=value "
                         "(e.g. --data_path=DIR)")
        overrides[key] = value
    return overrides


def _evaluate(args: Sequence[str]) -> int:
    parser = _parser("recbole-llm evaluate", epilog=OVERRIDES_HELP)
    parser.add_argument("--checkpoint", required=True, help="a .pth file RecBole's trainer saved")
    known, rest = parser.parse_known_args(args)
    overrides = _overrides(rest)
    if isinstance(overrides, int):
        return overrides

    from recbole.quick_start import load_data_and_model
    from recbole.utils import get_trainer, set_color

    from recbole_llm.checkpoint.overrides import config_overrides
    from recbole_llm.errors import RecboleLLMError

    sys.argv = sys.argv[:1]
    try:
        with config_overrides(overrides):
            config, model, _, train_data, _, test_data = load_data_and_model(known.checkpoint)
    except RecboleLLMError as error:
        return _fail(str(error))
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    # what Trainer.fit does first: metrics that need the training data (TailNDCG's item counts) get it
    trainer.eval_collector.data_collect(train_data)
    result = trainer.evaluate(test_data, load_best_model=False, show_progress=config["show_progress"])
    trainer.logger.info(set_color("test result", "yellow") + f": {result}")
    return 0


def _export(args: Sequence[str]) -> int:
    parser = _parser("recbole-llm export", epilog=OVERRIDES_HELP)
    parser.add_argument("--checkpoint", required=True, help="a .pth file RecBole's trainer saved")
    parser.add_argument("--output", required=True, help="the artifact folder to create")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (14-20, default 17)")
    parser.add_argument("--top-k", type=int, default=None, help="the graph returns the top K items and scores")
    parser.add_argument("--optimize", action="store_true", help="ONNX Runtime transformer fusions")
    parser.add_argument("--int8", action="store_true", help="dynamic int8 quantization (CPU)")
    parser.add_argument("--fp16", action="store_true", help="fp16 weights (GPU)")
    parser.add_argument("--triton", action="store_true", help="also write a Triton model repository")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--item-index", action="store_true",
                        help="the graph returns user vectors and the item table is a file, so items can be added "
                             "from their text (add-items) and the runtime ranks (recbole_llm models only; not with "
                             "--top-k, --int8, --fp16 or --triton)")
    known, rest = parser.parse_known_args(args)
    overrides = _overrides(rest)
    if isinstance(overrides, int):
        return overrides

    from recbole_llm.errors import RecboleLLMError
    from recbole_llm.export.options import ExportOptions, check_before_loading

    options = ExportOptions(
        opset=known.opset, top_k=known.top_k, optimize=known.optimize, int8=known.int8,
        fp16=known.fp16, triton=known.triton, force=known.force, config_overrides=overrides,
        item_index=known.item_index,
    )
    try:
        check_before_loading(known.checkpoint, known.output, options)  # at once, before torch loads
        from recbole_llm.export.pipeline import export_checkpoint

        result = export_checkpoint(known.checkpoint, known.output, options)
    except RecboleLLMError as error:
        return _fail(str(error))
    print("\n".join(result.summary()))
    return 0


ENGINES = ("fastapi", "triton")
# serve's options that one engine has and the other has not: given with the other engine, they are refused
FASTAPI_ONLY = {"--max-body-bytes": "max_body_bytes", "--body-timeout": "body_timeout",
                "--keep-alive-timeout": "keep_alive_timeout", "--max-explained": "max_explained",
                "--no-batching": "no_batching", "--allow-item-updates": "allow_item_updates",
                "--max-new-items": "max_new_items"}
TRITON_ONLY = {"--grpc-port": "grpc_port", "--metrics-port": "metrics_port"}


def _serve(args: Sequence[str]) -> int:
    from recbole_llm.serving.requests import Limits  # the defaults live there, once (numpy only, no fastapi)

    default = Limits()
    parser = argparse.ArgumentParser(prog="recbole-llm serve", allow_abbrev=False)
    parser.add_argument("artifact", help="a folder written by recbole-llm export")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port, 1 to 65535 (default 8000)")
    parser.add_argument("--unknown-tokens", default="skip", help="skip (default) or error: unknown item tokens")
    parser.add_argument("--max-batch", type=int, default=default.max_batch,
                        help=f"histories per request and per model call (default {default.max_batch})")
    parser.add_argument("--max-history", type=int, default=default.max_history,
                        help=f"item tokens per history (default {default.max_history})")
    parser.add_argument("--max-explained", type=int, default=default.max_explained,
                        help="model rows per explained request: each history, and it once without each item the "
                             f"model reads; the answer may hold 100x as many effects (default {default.max_explained})")
    parser.add_argument("--max-body-bytes", type=int, default=default.max_body_bytes,
                        help=f"request body size in bytes (default {default.max_body_bytes})")
    parser.add_argument("--body-timeout", type=float, default=default.body_timeout,
                        help="seconds for a request's head, and its body, to arrive (else 408), and for a client "
                             f"to take some of its answer (default {default.body_timeout:g})")
    parser.add_argument("--keep-alive-timeout", type=float, default=default.keep_alive_timeout,
                        help=f"seconds an idle connection stays open (default {default.keep_alive_timeout:g})")
    parser.add_argument("--shutdown-timeout", type=float, default=default.shutdown_timeout,
                        help="seconds requests in flight may take to finish after SIGTERM or SIGINT "
                             f"(default {default.shutdown_timeout:g})")
    parser.add_argument("--no-batching", action="store_true", help="one model call per request")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    parser.add_argument("--allow-item-updates", action="store_true",
                        help="turn POST /items on: new items from their text (an artifact exported with --item-index)")
    parser.add_argument("--max-new-items", type=int, default=default.max_new_items,
                        help=f"items one POST /items may add (default {default.max_new_items})")
    parser.add_argument("--retrieval", default="exact", choices=("exact", "ann"),
                        help="exact (default: every item scored) or ann (faiss IVF over an --item-index artifact)")
    parser.add_argument("--engine", default="fastapi", choices=ENGINES,
                        help="fastapi (default: the JSON service) or triton: Triton Inference Server (the one PyTriton's wheel ships), "
                             "KServe v2 over HTTP (--port) and gRPC (needs: pip install 'recbole_llm[triton]')")
    parser.add_argument("--grpc-port", type=int, default=None, help="--engine triton: gRPC port (default 8001)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="--engine triton: Prometheus metrics port (default 8002)")
    parser.error = lambda message: sys.exit(_fail(f"{message} (see: recbole-llm serve --help)"))  # one line
    known = parser.parse_args(args)

    from recbole_llm.errors import RecboleLLMError

    if not 1 <= known.port <= 65535:
        return _fail(f"--port {known.port} is not a TCP port; use 1 to 65535")
    if known.threads is not None and known.threads < 1:
        return _fail(f"--threads {known.threads} must be a positive number of threads (leave it out: all cores)")
    limits = Limits(max_body_bytes=known.max_body_bytes, max_batch=known.max_batch, max_history=known.max_history,
                    max_explained=known.max_explained, max_new_items=known.max_new_items,
                    body_timeout=known.body_timeout, keep_alive_timeout=known.keep_alive_timeout,
                    shutdown_timeout=known.shutdown_timeout)
    if known.engine == "triton":
        given = [option for option, name in FASTAPI_ONLY.items() if getattr(known, name) != parser.get_default(name)]
        if given:
            return _fail(f"{given[0]} applies to the FastAPI service only; leave it out with --engine triton")
    else:
        given = [option for option, name in TRITON_ONLY.items() if getattr(known, name) is not None]
        if given:
            return _fail(f"{given[0]} applies to --engine triton only")
    try:
        limits.check()
        if known.engine == "triton":
            from recbole_llm.serving.triton import serve_triton

            return serve_triton(known.artifact, known.host, known.port,
                                8001 if known.grpc_port is None else known.grpc_port,
                                8002 if known.metrics_port is None else known.metrics_port, limits,
                                known.unknown_tokens, known.threads, known.retrieval)  # tritonserver's exit status
        else:
            from recbole_llm.serving.http import serve

            serve(known.artifact, known.host, known.port, limits, known.unknown_tokens, not known.no_batching,
                  known.threads, known.allow_item_updates, known.retrieval)
    except RecboleLLMError as error:
        return _fail(str(error))
    return 0


def _add_items(args: Sequence[str]) -> int:
    parser = _parser("recbole-llm add-items", description=(
        "Add items to an artifact exported with --item-index, each from its text alone (the model's text "
        "tower): the updated artifact is written to a new folder, then renamed into place."))
    parser.add_argument("artifact", help="a folder written by recbole-llm export --item-index")
    parser.add_argument("items", help="a tab-separated file with a header: the item token, then the item's fields; "
                                      "the model's text fields are used, other columns left out (RecBole's .item "
                                      "format works: item_id:token, movie_title:token_seq, ...)")
    parser.add_argument("--output", default=None, help="write the updated artifact here (default: replace ARTIFACT)")
    known = parser.parse_args(args)

    from recbole_llm.errors import RecboleLLMError
    from recbole_llm.serving.catalogue import read_items_file
    from recbole_llm.serving.runtime import Recommender

    from pathlib import Path

    if known.output is not None and Path(known.output).exists():
        return _fail(f"--output '{known.output}' exists; choose a new folder, or leave --output out to replace "
                     f"'{known.artifact}'")
    try:
        recommender = Recommender(known.artifact)
        fields = (recommender.text_tower or {}).get("item_text_fields")
        items = read_items_file(known.items, fields)  # columns other than the model's text fields are left out
        recommender.add_items(items)
        written = recommender.save(known.output or known.artifact, replace=known.output is None)
    except RecboleLLMError as error:
        return _fail(str(error))
    present = {name for fields_of in items.values() for name in fields_of}  # in the model's order, as it joins them
    used = [name for name in fields or sorted(present) if name in present]
    plural = "item" if len(items) == 1 else "items"
    print(f"added {len(items)} {plural} (text from {', '.join(used)}; {len(recommender.tokens) - 1} items in all); "
          f"wrote {written}")
    return 0


def _models() -> int:
    from recbole_llm.model.catalog import PLUGIN_MODELS, available_models

    for name in available_models():
        print(f"{name}\t{'recbole_llm' if name in PLUGIN_MODELS else 'recbole'}")
    return 0


INTERRUPTED_STATUS = 130  # 128 + SIGINT, as a shell reports it


# What an interrupted command leaves, for the one line Ctrl-C prints (serve handles SIGINT itself: it drains).
INTERRUPTED = {
    "run": "checkpoints saved before it stay in checkpoint_dir (continue with --resume_from=CHECKPOINT)",
    "evaluate": "nothing was written",
    "export": "no artifact was written (the output folder is as it was)",
    "add-items": "the artifact is as it was",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except BrokenPipeError:  # `recbole-llm models | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:  # Ctrl-C: one line, not the traceback of wherever RecBole or torch was
        command = argv[0] if argv else ""
        left = INTERRUPTED.get(command, "nothing was written")
        print(f"\nrecbole-llm: interrupted; {left}", file=sys.stderr)
        return INTERRUPTED_STATUS


def entry() -> None:
    """The ``recbole-llm`` command and ``python -m recbole_llm``: exit with :func:`main`'s status.

    After Ctrl-C the process leaves at once (``os._exit``) once its one line is out, skipping Python's shutdown:
    in a local CI run (2026-12-07) an interrupted ``evaluate`` printed its line and was then ended by a repeated
    Ctrl-C (status -2, not 130) while Python was still shutting down. Nothing is left to write by then:
    checkpoints and artifacts are renamed into place whole or not at all, and log handlers flush each line.
    A Ctrl-C that lands while the line is printed counts as the same interruption; ``run --nproc N``'s ranks,
    which got the terminal's Ctrl-C too, are given up to 10 s to leave before the process does.
    """
    try:
        status = main()
        if status == INTERRUPTED_STATUS:
            sys.stdout.flush()
            sys.stderr.flush()
    except KeyboardInterrupt:  # another Ctrl-C while the line was printed or flushed
        status = INTERRUPTED_STATUS
    if status == INTERRUPTED_STATUS:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # nothing is left to interrupt
        multiprocessing = sys.modules.get("multiprocessing")
        if multiprocessing is not None:  # data-loader workers are daemons and leave with the process
            deadline = time.monotonic() + 10
            for child in [c for c in multiprocessing.active_children() if not c.daemon]:
                child.join(max(0.0, deadline - time.monotonic()))
        os._exit(status)
    sys.exit(status)


def _main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    missing = [name for name in TRAINING_PACKAGES if importlib.util.find_spec(name) is None]
    if command in ("run", "evaluate", "export", "models") and missing and not {"-h", "--help"} & set(rest):
        # a serving install (export/requirements-serve.txt): only `serve` and `add-items` work there
        return _fail(
            f"'{command}' needs the full install ({', '.join(missing)} missing; this looks like a serving install, "
            "which runs only 'serve' and 'add-items'): pip install torch==2.13.0 && pip install recbole_llm (from a checkout: "
            "pip install -e .; on Python >= 3.12 first pip install --no-deps recbole==1.2.1)"
        )
    if command == "run":
        return _run(rest)
    if command == "evaluate":
        return _evaluate(rest)
    if command == "export":
        return _export(rest)
    if command == "serve":
        return _serve(rest)
    if command == "add-items":
        return _add_items(rest)
    if command == "models":
        if rest:
            print("usage: recbole-llm models   (lists the models 'run' accepts: the plugin's, then RecBole's)")
            return 0 if rest[0] in ("-h", "--help") else 2
        return _models()
    return _fail(
        f"unknown command '{command}'; commands: run, evaluate, export, add-items, serve, models (see "
        "recbole-llm --help)"
    )


if __name__ == "__main__":
    entry()
