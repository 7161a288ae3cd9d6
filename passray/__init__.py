"""passray: PASS structured pruning (visual prompt + recurrent hypernetwork).

The core is pure PyTorch; Ray and MLflow live in ``passray.train``, ``passray.tune``,
``passray.tracking`` and ``passray.transfer`` and are never imported from here.
"""

__version__ = "0.1.0"
