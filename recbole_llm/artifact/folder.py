"""Writing an artifact folder atomically: into a staging folder beside it, renamed into place when whole.

Readers see the old folder or the new one, never a mix; a failed write leaves nothing behind, and the
leftovers of a writer killed mid-write are removed (or, for a swapped-out artifact, put back) by the next
write to the same folder. Used by ``recbole-llm export`` and by the runtime's ``save`` (``add-items``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path


def replace_folder(staging: Path, output: Path) -> None:
    """Move the finished folder ``staging`` to ``output`` (a sibling), replacing what is there: readers see
    the old folder or the new one, never a mix; a leftover of a killed run is removed by the next one."""
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")  # named so remove_leftovers finds it
        os.replace(output, old)
        os.replace(staging, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, output)


def remove_leftovers(output: Path) -> None:
    """Staging and swap folders of writes to ``output`` whose process is gone (killed mid-write); a swapped-out
    artifact whose writer died between its two renames is put back, not removed."""
    for leftover in sorted(output.parent.glob(f".{output.name}.*")):
        match = re.fullmatch(rf"\.{re.escape(output.name)}\.(partial|old)-(\d+)(?:-.*)?", leftover.name)
        if match is None or not leftover.is_dir():
            continue
        pid = int(match.group(2))
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            if match.group(1) == "old" and not output.exists():
                os.replace(leftover, output)
            else:
                shutil.rmtree(leftover, ignore_errors=True)
        except PermissionError:  # another user's live process
            pass


def staging_folder(output: Path) -> Path:
    """A new, empty folder beside ``output`` to write into before :func:`replace_folder`."""
    import tempfile

    output.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(output)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-{os.getpid()}-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the artifact is an ordinary folder
    return staging


@contextlib.contextmanager
def atomic_folder(output: Path) -> Iterator[Path]:
    """A new, empty staging folder beside ``output`` (:func:`staging_folder`) to write the folder into; when
    the block ends without an exception it replaces ``output`` (:func:`replace_folder`). Whatever fails, Ctrl-C
    included, the staging folder is removed and ``output`` is left as it was; the exception propagates."""
    staging = staging_folder(output)
    try:
        yield staging
        replace_folder(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
