"""Timing cases of ``bench/triton_kernels.py``, one module per op (qoft, timestep_scale, quant_full, stash).

Each module exposes ``cases(size: str) -> list[Case]`` (``size``: ``full``, ``quick`` or ``smoke``);
``bench/triton_kernels.py`` times them all on one GPU.
"""
