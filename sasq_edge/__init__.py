"""sasq-edge: static INT8 activation quantization with trained scales (SASQ, arXiv 2512.14481).

Typical use::

    from sasq_edge import QuantConfig, prepare, calibrate, train_scales, ScaleState
    prepare(model, config); calibrate(model, batches, config); train_scales(model, windows, config)
    ScaleState.from_model(model, config, "my/model").save("run/")

Names are imported lazily so that the torch-free parts (``sasq_edge.data``) stay torch-free.
"""

__version__ = "0.1.0"

_API = {
    "QuantConfig": "sasq_edge.config",
    "PROFILES": "sasq_edge.config",
    "prepare": "sasq_edge.modules",
    "QuantLinear": "sasq_edge.modules",
    "calibrate": "sasq_edge.calibrate",
    "train_scales": "sasq_edge.train",
    "ScaleState": "sasq_edge.state",
    "load_model": "sasq_edge.models",
    "perplexity": "sasq_edge.evaluate",
    "SasqError": "sasq_edge.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'sasq_edge' has no attribute {name!r}")
