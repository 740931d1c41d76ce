"""Crash-safe build cache of a native library (the CPU attention op): staged builds, verified loads, breakable locks.

Layout under the cache root (one folder per build key; the key hashes sources, flags and versions):

    <key>/                      a completed build: ninja's objects, ``<name>.so`` and ``manifest.json``
    <key>/manifest.json         written last: the library's file name, size and sha256
    <key>.lock                  held while one process builds: {"pid", "host", "time"}
    .<key>.staging-<pid>-<tag>/  a build in progress (swept once its process is gone)

Guarantees, in every process that comes after any crash (kill -9, disk full, a compiler that hangs):
- A library is loaded only after its size and sha256 match the manifest that the completed build wrote last; a
  truncated or altered library is never dlopen'ed (a truncated ELF mapped by dlopen raises SIGBUS on first use). A
  folder that fails the check is moved aside and rebuilt (ninja reuses its objects, so this is mostly a relink).
- A build runs in a child process with a time limit (``DEBERTA_FAST_BUILD_TIMEOUT`` seconds, default 900) in a
  private staging folder that is renamed into place only when complete; the child also dlopens the result once,
  so a library that cannot load fails there, not in the caller.
- A lock whose owner process is gone (same host), or that is older than the time limit plus a margin, is broken
  with a warning; a process never waits longer than that bound for another one's build.
- Any failure raises :class:`BuildFailed` with the reason (compiler output tail, time limit, ...); callers turn it
  into the reason ``auto`` logs before falling back, or into the error of an explicit request.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger("deberta_fast")

MANIFEST = "manifest.json"
TIMEOUT_ENV_VAR = "DEBERTA_FAST_BUILD_TIMEOUT"
DEFAULT_TIMEOUT_S = 900.0
LOCK_MARGIN_S = 120.0  # a lock older than the build time limit plus this is stale even if its pid looks alive
_POLL_S = 0.5
_STAGING = re.compile(r"^\.(?P<key>[^.]+)\.(staging|broken)-(?P<pid>\d+)-[0-9a-f]+$")

# Runs in the build child: compile with ninja into the staging folder, then dlopen the result once (a library that
# cannot load fails here, in a process whose crash costs nothing).
_CHILD = r"""
import ctypes, json, os, signal, sys
if sys.platform.startswith("linux"):
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the process that waits for us
spec = json.loads(sys.argv[1])
from torch.utils import cpp_extension
cpp_extension.load(name=spec["name"], sources=spec["sources"], extra_cflags=spec["cflags"],
                   extra_ldflags=spec["ldflags"], extra_include_paths=spec["include_paths"],
                   build_directory=spec["directory"], is_python_module=False, verbose=False)
"""


class BuildFailed(RuntimeError):
    """The native library could not be built or verified; the message is the reason."""


def build_timeout() -> float:
    """Seconds a build may take (``DEBERTA_FAST_BUILD_TIMEOUT``, default 900); ValueError on a bad value."""
    text = os.environ.get(TIMEOUT_ENV_VAR)
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"environment variable {TIMEOUT_ENV_VAR}: expected a finite number of seconds > 0; "
                         f"got {text!r}")
    return value


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_library(folder: Path) -> tuple[Path | None, str]:
    """(library path, "") when ``folder`` holds a completed build whose library matches its manifest; else
    (None, why not) — "" when there is no completed build at all."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return None, ("the folder has no manifest (an incomplete build)" if folder.exists() else "")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        library = folder / manifest["library"]
        size, sha256 = int(manifest["size"]), str(manifest["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"its manifest {manifest_path} is unreadable ({type(error).__name__}: {error})"
    if not library.is_file():
        return None, f"{library} is missing"
    actual = library.stat().st_size
    if actual != size:
        return None, f"{library} has {actual} bytes, the completed build wrote {size}"
    if file_digest(library) != sha256:
        return None, f"{library} differs from what the completed build wrote (sha256 mismatch)"
    return library, ""


def build_or_load(root: Path, key: str, name: str, sources: list[str], cflags: list[str], ldflags: list[str],
                  include_paths: list[str], timeout: float | None = None) -> Path:
    """Path of a verified library built from ``sources`` under ``root/key`` (built now if needed).

    Raises BuildFailed with the reason when it cannot be built, verified or waited for within the time limit."""
    timeout = build_timeout() if timeout is None else timeout
    root.mkdir(parents=True, exist_ok=True)
    final, lock = root / key, root / f"{key}.lock"
    waited_for = None
    while True:
        library, problem = verified_library(final)
        if library is not None:
            return library
        if _acquire(lock):
            try:
                library, problem = verified_library(final)
                if library is not None:
                    return library
                return _build(root, final, key, name, sources, cflags, ldflags, include_paths, timeout, problem)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)
        owner = _lock_owner(lock)
        stale = _stale_reason(lock, owner, timeout)
        if stale:
            logger.warning("deberta_fast: breaking the stale build lock %s (%s)", lock, stale)
            _break(lock)
            continue
        if waited_for != owner.get("pid"):
            waited_for = owner.get("pid")
            logger.warning("deberta_fast: waiting for process %s, which is building the native CPU op (lock %s)",
                           waited_for, lock)
        time.sleep(_POLL_S)


def _acquire(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}, handle)
    return True


def _lock_owner(lock: Path) -> dict:
    try:
        owner = json.loads(lock.read_text(encoding="utf-8"))
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}  # gone meanwhile, or created and not yet written: judged by its age


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _stale_reason(lock: Path, owner: dict, timeout: float) -> str:
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return ""  # released meanwhile
    pid = owner.get("pid")
    if isinstance(pid, int) and owner.get("host") == socket.gethostname() and not pid_alive(pid):
        return f"its owner, process {pid}, is gone"
    bound = timeout + LOCK_MARGIN_S
    if age > bound:
        return f"it is {age:.0f} s old, longer than a build may take ({bound:.0f} s)"
    return ""


def _break(lock: Path) -> None:
    # Rename first: of two processes breaking the same lock, only one removes it.
    aside = lock.with_name(f"{lock.name}.broken-{os.getpid()}-{secrets.token_hex(4)}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(lock, aside)
        os.unlink(aside)


def sweep(root: Path) -> None:
    """Remove staging / broken folders whose process is gone (builds killed before they completed)."""
    for entry in root.iterdir():
        match = _STAGING.match(entry.name)
        if match and int(match["pid"]) != os.getpid() and not pid_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)


def _build(root, final, key, name, sources, cflags, ldflags, include_paths, timeout, problem) -> Path:
    sweep(root)
    staging = root / f".{key}.staging-{os.getpid()}-{secrets.token_hex(4)}"
    if final.exists():
        # A build that fails the check: keep its objects (ninja rebuilds only what is missing or out of date) but
        # never its library or manifest.
        logger.warning("deberta_fast: the cached native CPU op in %s is not usable (%s); rebuilding it", final,
                       problem)
        os.rename(final, staging)
        # "lock" is torch's FileBaton of a build that may have been killed inside this folder: ours now.
        for stale in list(staging.glob("*.so")) + [staging / MANIFEST, staging / "lock"]:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
    else:
        logger.warning("deberta_fast: compiling the native CPU op on first use (about a minute, once; cached in %s)",
                       final)
        staging.mkdir()
    try:
        _compile(staging, name, sources, cflags, ldflags, include_paths, timeout)
        library = staging / f"{name}.so"
        if not library.is_file():
            raise BuildFailed(f"the build finished without writing {library.name}")
        _write_manifest(staging, library)
        os.rename(staging, final)
        _fsync_directory(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    library, problem = verified_library(final)
    if library is None:
        raise BuildFailed(f"the completed build in {final} fails its own check: {problem}")
    return library


def _compile(directory, name, sources, cflags, ldflags, include_paths, timeout) -> None:
    spec = json.dumps({"name": name, "sources": sources, "cflags": cflags, "ldflags": ldflags,
                       "include_paths": include_paths, "directory": str(directory)})
    log_path = directory / "build.log"
    with open(log_path, "w") as log:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, spec], stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = child.wait(timeout=timeout)
        except BaseException as error:  # the time limit, or this process being interrupted: stop the compilers
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            if isinstance(error, subprocess.TimeoutExpired):
                raise BuildFailed(f"the build did not finish within {timeout:g} s ({TIMEOUT_ENV_VAR} sets the "
                                  "limit)") from None
            raise
    if code != 0:
        tail = " ".join(log_path.read_text(errors="replace").split()[-80:])
        raise BuildFailed(f"the build failed (exit code {code}): {tail}")


def _write_manifest(directory: Path, library: Path) -> None:
    with open(library, "rb") as handle:
        os.fsync(handle.fileno())
    manifest = {"library": library.name, "size": library.stat().st_size, "sha256": file_digest(library)}
    temporary = directory / f"{MANIFEST}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, directory / MANIFEST)
    _fsync_directory(directory)


def _fsync_directory(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
