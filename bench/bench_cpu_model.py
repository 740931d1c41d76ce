"""CPU model benchmark (see deberta_fast/benchmark/cpu_model.py): python bench/bench_cpu_model.py --help"""

from deberta_fast.benchmark.cpu_model import main

if __name__ == "__main__":
    main()
