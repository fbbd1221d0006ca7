"""fedlease's Triton kernels, installed as ``fedlease.kernels``.

In a checkout this folder sits at the top level, so a process started in the checkout's root
(``python -m pytest``, ``python -m fedlease``) finds it under the name ``kernels`` first, ahead of
the PyPI package ``kernels`` that transformers (>= 5.25, a hard dependency) imports for its hub
kernels. Imported under that name, this module hands the name to the installed package, so
``import kernels`` means the same thing inside and outside a checkout.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
        _spec.loader.exec_module(_module)
