"""GPU benchmark script (see deberta_fast/benchmark/gpu_attention.py): python bench/gpu_attention.py --help"""

from deberta_fast.benchmark.gpu_attention import main

if __name__ == "__main__":
    main()
