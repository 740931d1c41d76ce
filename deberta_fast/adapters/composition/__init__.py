"""Running several adapters together: the composition blocks (``blocks.py``: Stack, Parallel, Fuse, ...),
AdapterFusion (``fusion.py``: its configs and layer) and the model's fusion API (``fusion_management.py``). The three
sit on different layers (blocks and fusion low, the API high), so this file imports nothing (layer order:
tests/test_adapters_layout.py)."""
