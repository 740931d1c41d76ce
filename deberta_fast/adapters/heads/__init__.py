"""Flexible prediction heads: the head modules (``prediction.py``), the model's head API (``management.py``) and the
conversion of transformers' static heads (``static.py``). Imports nothing itself, so that importing one of these
files loads only what that file needs (layer order: tests/test_adapters_layout.py)."""
