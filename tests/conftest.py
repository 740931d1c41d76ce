"""Test setup shared by every test module.

Triton must see TRITON_INTERPRET=1 before it is first imported (transformers' DeBERTa module imports it), so
the variable is set here, at collection start, whenever no GPU is present.
"""

import os
import tempfile

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# torch Inductor's FX-graph cache key leaves out the vector ISA its C++ kernels were generated for (torch 2.13): a
# graph cached by a run at another ATEN_CPU_CAPABILITY (or on another CPU sharing the folder) is reused and its
# kernels read past their vectors (NaN logits, then a segfault, under ATEN_CPU_CAPABILITY=avx2 after an AVX-512 run).
# One cache folder per capability, unless the caller chose one.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _user = os.environ.get("USER", "") or str(getattr(os, "getuid", lambda: "user")())
    _user = "".join(c for c in _user if c.isalnum() or c in "-_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{_user}_{torch.backends.cpu.get_cpu_capability().lower()}")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test, deselect with -m 'not slow'")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def native_ops():
    """The native CPU library (attention, bias + GELU, residual + LayerNorm) must build on this machine: the test
    modules that compare it with the reference use this fixture, so a build failure fails them instead of letting
    dispatch fall back to the reference unnoticed."""
    from deberta_fast.ops import attention_cpu, bias_gelu, residual_layernorm

    for op in (attention_cpu, bias_gelu, residual_layernorm):
        error = op.build_error()
        assert not error, f"the native op must build on this machine ({op.__name__}): {error}"
