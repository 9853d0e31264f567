"""Timing cases of ``bench/kernels.py``, one module per op (qoft, timestep_scale, quant_full, stash).

Each module exposes ``cases(size: str) -> list[Case]`` (``size``: ``full``, ``quick`` or ``smoke``);
``bench/kernels.py`` times them all on one GPU.
"""
