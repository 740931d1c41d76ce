"""The native CPU op is built for torch's runtime vector ISA, never for the build machine's (issue 12, item 3).

A cached library built on an AVX-512 machine must never be loaded on a CPU without AVX-512 (a home directory or CI
cache shared between an Intel and an AMD machine, or a container moved between hosts): the compiler flags follow
``torch.backends.cpu.get_cpu_capability()`` (which honours ATEN_CPU_CAPABILITY) and are part of the cache key, so a
CPU with another capability gets another key and builds its own library. torch fixes its capability once per
process, so each setting is read in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from deberta_fast.ops import attention_cpu

PROBE = """
import json, torch
from deberta_fast.ops import attention_cpu
flags = attention_cpu.compile_flags()
sources = sorted(p for p in attention_cpu.source_dir().iterdir() if p.suffix in (".cpp", ".h"))
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "flags": flags,
                  "key": attention_cpu.build_key(sources, flags)}))
"""

AVX512_ONLY = {"-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"}
VECTOR_FLAGS = AVX512_ONLY | {"-mavx2", "-mfma", "-mf16c", "-mavx"}


def probe(capability: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def probes() -> dict:
    if attention_cpu.source_dir() is None:
        pytest.skip("the C++ sources (csrc/) are not installed with this copy of deberta_fast")
    return {name: probe(name) for name in (None, "avx2", "default")}


def test_flags_never_target_the_build_machine(probes):
    for found in probes.values():
        assert not any("native" in flag for flag in found["flags"]), found["flags"]  # -march/-mtune=native


def test_flags_follow_torchs_runtime_capability(probes):
    default, avx2 = probes["default"], probes["avx2"]
    assert default["capability"] == "DEFAULT"
    assert not VECTOR_FLAGS & set(default["flags"]), default["flags"]
    assert "-DCPU_CAPABILITY_DEFAULT" in default["flags"]
    if avx2["capability"] == "AVX2":  # x86-64 builds of torch (elsewhere "avx2" is ignored with a warning)
        assert {"-mavx2", "-mfma"} <= set(avx2["flags"]) and not AVX512_ONLY & set(avx2["flags"])
        assert "-DCPU_CAPABILITY_AVX2" in avx2["flags"]
    own = probes[None]
    if own["capability"] == "AVX512":
        assert AVX512_ONLY <= set(own["flags"]) and "-DCPU_CAPABILITY_AVX512" in own["flags"]


def test_each_capability_has_its_own_cache_key(probes):
    """Same sources, same torch: the key differs exactly when the ISA the library is compiled for differs."""
    by_isa = {}
    for found in probes.values():
        isa = next(flag for flag in found["flags"] if flag.startswith("-DCPU_CAPABILITY="))
        by_isa.setdefault(isa, set()).add(found["key"])
    assert all(len(keys) == 1 for keys in by_isa.values()), by_isa
    keys = [next(iter(keys)) for keys in by_isa.values()]
    assert len(set(keys)) == len(keys), by_isa
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert len(by_isa) >= 2, by_isa  # DEFAULT, AVX2 (and AVX512 on a CPU that has it)
