"""peft-quant's GPU kernels (installed as ``peft_quant.kernels``): Triton kernels, each with a PyTorch reference.

Every op has one entry point that runs the Triton kernel on CUDA tensors and the pure-PyTorch reference elsewhere
(:mod:`.backend` decides, with the ``PEFT_QUANT_KERNELS`` override). The Triton modules (``*_triton.py``) are imported
only when a kernel is about to run, so ``import peft_quant`` never imports Triton or initialises CUDA.

This folder is also importable as a top-level ``kernels`` whenever the checkout's root is on ``sys.path`` (Python puts
it first for ``python -c``, a REPL and ``python -m pytest`` run from the root). That name belongs to Hugging Face's
``kernels`` package, which transformers >= 5.24 installs and imports, so under that name this file hands over to it
(see :func:`_hand_over_top_level_name`). The ``__init__.py`` itself must stay: setuptools' editable installs (lenient
and strict) resolve the mapped ``peft_quant.kernels`` only through it; without it the editable install cannot import
``peft_quant.kernels`` at all (tests/test_packaging.py checks the wheel, the sdist and the editable install).
"""

import sys


def _hand_over_top_level_name() -> None:
    """Replace this module in ``sys.modules["kernels"]`` by what ``import kernels`` finds without the checkout's root.

    That is Hugging Face's package when it is installed. When nothing else is found, the name gets an empty namespace
    package instead: transformers (which probes ``kernels``, importing it when it has no metadata) reads a module
    without ``__file__`` or ``__version__`` as a shadowing folder, not an install, and bitsandbytes' probe
    ``from kernels import get_kernel`` fails with an ImportError, as it does when nothing is installed. The import
    machinery returns whatever ``sys.modules[name]`` holds once this file has run, so ``import kernels`` yields the
    replacement.
    """
    import importlib
    import importlib.machinery
    import importlib.util
    import os

    root = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir))
    del sys.modules[__name__]  # otherwise the import below would return this half-initialised module
    saved_path = sys.path[:]
    sys.path[:] = [entry for entry in saved_path if os.path.realpath(entry or os.curdir) != root]
    try:
        importlib.import_module(__name__)  # stores itself in sys.modules
    except ModuleNotFoundError as error:
        if error.name != __name__:
            raise  # Hugging Face's package is there but lacks one of its own dependencies
        spec = importlib.machinery.ModuleSpec(__name__, None, is_package=True)
        sys.modules[__name__] = importlib.util.module_from_spec(spec)
    finally:
        sys.path[:] = saved_path


if __name__ == "kernels":
    _hand_over_top_level_name()
else:
    from .backend import KernelUnavailableError, kernel_mode, use_triton

    __all__ = ["KernelUnavailableError", "kernel_mode", "use_triton"]
