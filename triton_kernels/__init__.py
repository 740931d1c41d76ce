"""Triton kernels of deberta_fast, installed as ``deberta_fast.triton_kernels``.

Only ``@triton.jit`` functions and their launch helpers live here: no autograd, no nn.Module. Importing a
kernel module imports triton; this package itself imports nothing.
"""
