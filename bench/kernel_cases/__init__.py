"""Timing cases of ``bench/kernels.py``, one module per op (qoft, timestep_scale, quant_full, stash).

Each module exposes ``cases(quick: bool) -> list[Case]``; ``bench/kernels.py`` times them all on one GPU.
"""
