"""GPU benchmark script (see deberta_fast/benchmark/gpu_adapters.py): python bench/gpu_adapters.py --help"""

from deberta_fast.benchmark.gpu_adapters import main

if __name__ == "__main__":
    main()
