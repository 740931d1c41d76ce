"""The native-op build cache survives crashes (issue 13, findings 1 and 2): deberta_fast/ops/native_cache.py.

Fast tests build a one-function C++ probe through the same machinery (seconds); the two slow tests build the real
attention op once in a temporary cache (about a minute on an idle machine), kill a build with SIGKILL, and
truncate the cached library, each time checking that a fresh process neither hangs nor crashes.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deberta_fast.ops import native_cache

PROBE = 'extern "C" int deberta_fast_probe() { return 42; }\n'


def build_probe(root: Path, key: str = "probe", timeout: float = 300.0) -> Path:
    source = root.parent / f"{key}.cpp"
    source.write_text(PROBE)
    return native_cache.build_or_load(root, key, f"probe_{key}", [str(source)], ["-O0"], [], [], timeout=timeout)


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_completed_build_has_a_manifest_matching_its_library(tmp_path):
    library = build_probe(tmp_path / "cache")
    manifest = json.loads((library.parent / native_cache.MANIFEST).read_text())
    assert manifest["library"] == library.name
    assert manifest["size"] == library.stat().st_size
    assert ctypes.CDLL(str(library)).deberta_fast_probe() == 42
    assert not list((tmp_path / "cache").glob(".*staging*")), "the staging folder must be renamed into place"
    assert not (tmp_path / "cache" / "probe.lock").exists()


@pytest.mark.parametrize("damage", ["truncate", "same_size_flip", "no_manifest"])
def test_damaged_library_is_never_loaded_and_is_rebuilt_in_a_fresh_process(tmp_path, damage):
    """Finding 1: a cut-short (or altered) library newer than its objects was dlopen'ed -> SIGBUS forever."""
    root = tmp_path / "cache"
    library = build_probe(root)
    data = library.read_bytes()
    if damage == "truncate":
        library.write_bytes(data[: len(data) // 2])
        (library.parent / "lock").write_text("")  # torch's FileBaton of a build killed in this folder
    elif damage == "same_size_flip":
        library.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:
        (library.parent / native_cache.MANIFEST).unlink()
    later = time.time() + 10
    os.utime(library, (later, later))  # newer than its objects: ninja alone would call it up to date
    found, problem = native_cache.verified_library(library.parent)
    assert found is None and problem
    script = textwrap.dedent(f"""
        import ctypes, logging, sys
        from pathlib import Path
        logging.basicConfig(level=logging.WARNING)
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_native_cache import build_probe
        print(ctypes.CDLL(str(build_probe(Path({str(root)!r})))).deberta_fast_probe())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "42"
    assert "not usable" in result.stderr and "rebuilding" in result.stderr
    assert native_cache.verified_library(library.parent)[0] == library


def write_lock(path: Path, pid: int, host: str, age: float = 0.0) -> None:
    path.write_text(json.dumps({"pid": pid, "host": host, "time": time.time() - age}))
    if age:
        past = time.time() - age
        os.utime(path, (past, past))


def test_lock_of_a_dead_process_is_broken_with_a_message(tmp_path, caplog):
    """Finding 2: a build killed by SIGKILL left its lock and every later process waited forever."""
    root = tmp_path / "cache"
    root.mkdir()
    write_lock(root / "probe.lock", dead_pid(), socket.gethostname())
    with caplog.at_level(logging.WARNING, logger="deberta_fast"):
        library = build_probe(root)
    assert ctypes.CDLL(str(library)).deberta_fast_probe() == 42
    assert any("breaking the stale build lock" in r.getMessage() and "is gone" in r.getMessage()
               for r in caplog.records)


def test_lock_older_than_a_build_may_take_is_broken(tmp_path, caplog, monkeypatch):
    """A lock from another host (pid not checkable), or whose pid was reused, is judged by its age."""
    monkeypatch.setattr(native_cache, "LOCK_MARGIN_S", -296.0)  # bound = 300 s time limit - 296 = 4 s
    root = tmp_path / "cache"
    root.mkdir()
    started = time.monotonic()
    write_lock(root / "probe.lock", os.getppid(), "another-host", age=5.0)
    with caplog.at_level(logging.WARNING, logger="deberta_fast"):
        build_probe(root, timeout=300.0)
    assert any("breaking the stale build lock" in r.getMessage() and "5 s old" in r.getMessage()
               for r in caplog.records)
    assert time.monotonic() - started < 120


def test_live_lock_is_waited_for_and_then_its_build_is_used(tmp_path, caplog, monkeypatch):
    """Another live process building: wait (with a message), then load what it completed."""
    root = tmp_path / "cache"
    build_probe(root)
    (root / "probe").rename(tmp_path / "done")
    holder = subprocess.Popen(["sleep", "60"])
    try:
        write_lock(root / "probe.lock", holder.pid, socket.gethostname())

        def finish_later():
            time.sleep(1.5)
            (tmp_path / "done").rename(root / "probe")
            (root / "probe.lock").unlink()

        import threading
        thread = threading.Thread(target=finish_later)
        thread.start()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="deberta_fast"):
            library = build_probe(root)
        thread.join()
    finally:
        holder.kill()
        holder.wait()
    assert library == root / "probe" / "probe_probe.so"
    assert any(f"waiting for process {holder.pid}" in r.getMessage() for r in caplog.records)
    assert not any("compiling" in r.getMessage() for r in caplog.records), "the waiter must not build itself"


def test_build_that_fails_raises_the_reason_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    root = tmp_path / "cache"
    with pytest.raises(native_cache.BuildFailed, match="exit code"):
        build_probe(root)
    assert sorted(p.name for p in root.iterdir()) == [], "no lock, no staging folder, no half build"


def test_build_past_its_time_limit_is_stopped(tmp_path):
    root = tmp_path / "cache"
    started = time.monotonic()
    with pytest.raises(native_cache.BuildFailed, match="did not finish within 0.3 s"):
        build_probe(root, timeout=0.3)
    assert time.monotonic() - started < 30
    assert sorted(p.name for p in root.iterdir()) == []


def test_bad_timeout_variable_names_itself(monkeypatch):
    for text in ("soon", "0", "-5", "inf", "nan"):
        monkeypatch.setenv(native_cache.TIMEOUT_ENV_VAR, text)
        with pytest.raises(ValueError, match=native_cache.TIMEOUT_ENV_VAR):
            native_cache.build_timeout()


def test_staging_folders_of_killed_builds_are_swept(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    orphan = root / f".probe.staging-{dead_pid()}-0badc0de"
    orphan.mkdir()
    (orphan / "half.o").write_bytes(b"\0" * 100)
    live = root / f".probe.staging-{os.getppid()}-0badc0de"
    live.mkdir()
    build_probe(root)
    assert not orphan.exists()
    assert live.exists(), "a staging folder of a live process is its build in progress"


# ---- the real attention op ---------------------------------------------------------------------------------------

FORWARD = textwrap.dedent("""
    import json, logging, sys, torch
    logging.basicConfig(level=logging.WARNING)
    from deberta_fast.ops import attention_cpu, disentangled_attention
    from deberta_fast.ops.positions import RelativePositionSpec
    torch.manual_seed(0)
    spec = RelativePositionSpec(True, True, 8, 24)
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3)); pk, pq = torch.randn(2, 1, 2, 16, 8).unbind(0)
    out, _ = disentangled_attention(q, k, v, pk, pq, None, spec=spec, softmax_scale=0.2)
    ref, _ = disentangled_attention(q, k, v, pk, pq, None, spec=spec, softmax_scale=0.2, backend="reference")
    print(json.dumps(dict(error=attention_cpu.extension().error, diff=float((out - ref).abs().max()))))
""")


def run_forward(cache: Path, backend: str, timeout: float, **popen):
    env = dict(os.environ, DEBERTA_FAST_CACHE_DIR=str(cache), DEBERTA_FAST_BACKEND=backend)
    return subprocess.Popen([sys.executable, "-c", FORWARD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


@pytest.fixture(scope="module")
def killed_then_completed(tmp_path_factory):
    """A build killed with SIGKILL (its whole process group, as a job scheduler does) a few seconds in, then a
    second process that must break the lock and complete the real build. Returns (cache dir, its stderr, report)."""
    cache = tmp_path_factory.mktemp("native") / "cache"
    first = run_forward(cache, "cpu", 600, start_new_session=True)
    lock_seen = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        if list((cache / "cpu_ext_v2").glob("*.lock")) if (cache / "cpu_ext_v2").exists() else []:
            lock_seen = time.monotonic()
            break
        time.sleep(0.2)
    assert lock_seen is not None, "the first process never started a build"
    time.sleep(3.0)  # the compilers are running
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    assert list((cache / "cpu_ext_v2").glob("*.lock")), "the killed build must have left its lock (the scenario)"
    second = run_forward(cache, "cpu", 900)
    try:
        out, err = second.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        second.kill()
        out, err = second.communicate()
        pytest.fail(f"the second process hung behind the dead build's lock:\n{err[-3000:]}")
    assert second.returncode == 0, err[-3000:]
    return cache, err, json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_kill_9_during_the_real_build_then_a_second_process_completes(killed_then_completed):
    _, err, report = killed_then_completed
    assert report["error"] == ""
    assert report["diff"] < 1e-5
    assert "breaking the stale build lock" in err and "is gone" in err


@pytest.mark.slow
def test_truncated_real_library_rebuilds_instead_of_sigbus(killed_then_completed, tmp_path):
    cache, _, _ = killed_then_completed
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy, symlinks=True)
    (library,) = (copy / "cpu_ext_v2").glob("*/*.so")
    data = library.read_bytes()
    library.write_bytes(data[: len(data) // 3])
    later = time.time() + 10
    os.utime(library, (later, later))
    process = run_forward(copy, "auto", 900)
    out, err = process.communicate(timeout=900)
    assert process.returncode == 0, f"exit {process.returncode} (-7 is SIGBUS):\n{err[-3000:]}"
    report = json.loads(out.strip().splitlines()[-1])
    assert report["error"] == "" and report["diff"] < 1e-5
    assert "not usable" in err
    assert library.stat().st_size == len(data) or native_cache.verified_library(library.parent)[0] is not None


@pytest.mark.parametrize("failure, reason", [
    ("no_compiler", "exit code"),
    ("time_limit", "did not finish within 0.5 s"),
])
def test_unfinishable_build_auto_falls_back_and_explicit_cpu_raises(tmp_path, failure, reason):
    """Compiler missing or a build past its time limit: auto serves on the reference with the reason logged, an
    explicit cpu request raises BackendUnavailable with it; nothing is left behind to trip a later process."""
    script = textwrap.dedent("""
        import json, logging, torch
        records = []
        handler = logging.Handler(); handler.emit = lambda r: records.append(r.getMessage())
        logging.getLogger("deberta_fast").addHandler(handler)
        from deberta_fast.ops import BackendUnavailable, disentangled_attention
        from deberta_fast.ops.positions import RelativePositionSpec
        spec = RelativePositionSpec(True, True, 8, 24)
        q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3)); pk, pq = torch.randn(2, 1, 2, 16, 8).unbind(0)
        disentangled_attention(q, k, v, pk, pq, None, spec=spec, softmax_scale=0.2, backend="auto")
        try:
            disentangled_attention(q, k, v, pk, pq, None, spec=spec, softmax_scale=0.2, backend="cpu")
            raised = ""
        except BackendUnavailable as error:
            raised = str(error)
        print(json.dumps(dict(raised=raised, skips=[r for r in records if "auto skipped backend 'cpu'" in r])))
    """)
    env = dict(os.environ, DEBERTA_FAST_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("DEBERTA_FAST_BACKEND", None)
    if failure == "no_compiler":
        env["CXX"] = str(tmp_path / "no-such-compiler")
    else:
        env[native_cache.TIMEOUT_ENV_VAR] = "0.5"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["skips"]) == 1 and reason in report["skips"][0]
    assert "could not be built" in report["raised"] and reason in report["raised"]
    assert sorted(p.name for p in (tmp_path / "cache" / "cpu_ext_v2").iterdir()) == []
