"""Install deberta_fast. Pure Python: the Triton kernels compile at first launch and the native CPU op
(csrc/) compiles at first use with torch.utils.cpp_extension, against the torch already installed."""

from setuptools import find_namespace_packages, setup

setup(
    name="deberta_fast",
    version="0.1.0",
    description="Kernel-accelerated, drop-in DeBERTa-v2/v3 with AdapterHub-compatible adapters",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_namespace_packages(include=["deberta_fast", "deberta_fast.*"])
    + ["deberta_fast.triton_kernels", "deberta_fast.csrc"],
    # The folders triton_kernels/ and csrc/ are installed under deberta_fast: the top-level names belong to others.
    # csrc/ holds the native CPU op's C++ sources, compiled on first use (deberta_fast/ops/attention_cpu.py).
    package_dir={"deberta_fast.triton_kernels": "triton_kernels", "deberta_fast.csrc": "csrc"},
    package_data={"deberta_fast.data.movie_reviews": ["*.jsonl", "*.txt", "*.md"], "deberta_fast.csrc": ["*.cpp", "*.h"],
                  "deberta_fast.triton_kernels": ["*.json"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.5",
        "triton>=3.1; platform_system == 'Linux'",
        # Tested range: the lowest in CI's parity run (.ci/run), the highest in its full run. transformers
        # 5.0-5.19 cannot load a non-legacy DeBERTa-v2 masked-LM checkpoint (its own class fails too).
        "transformers>=5.20,<5.26",
        "sentencepiece",
        "safetensors",
        "huggingface_hub",
        "numpy",
        "tqdm",
        "matplotlib",  # deberta-fast train's training.png and deberta-fast bench's table PNG
    ],
    entry_points={"console_scripts": ["deberta-fast = deberta_fast.cli:main"]},
    extras_require={
        "test": ["pytest", "pytest-benchmark", "accelerate", "tqdm", "onnx", "onnxruntime", "onnxscript"],
        "bench": ["pytest-benchmark", "matplotlib"],
    },
)
