"""Full-model forward benchmark (see deberta_fast/benchmark/model.py): python bench/bench_model.py --help"""

from deberta_fast.benchmark.model import main

if __name__ == "__main__":
    main()
