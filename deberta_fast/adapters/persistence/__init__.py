"""Adapters on disk and on the Hub: AdapterHub 1.3.0's file format with atomic writes (``files.py``), the
save / load API for adapters, heads and fusions (``adapter_io.py``), adapter setups (``setup_io.py``) and the Hugging
Face Hub (``hub.py``). Imports nothing itself (layer order: tests/test_adapters_layout.py)."""
