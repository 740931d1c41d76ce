"""Benchmarks behind ``deberta-fast bench`` and the scripts in bench/: every provider the machine has, medians
from one process, CSV with machine and versions, a printed table."""
