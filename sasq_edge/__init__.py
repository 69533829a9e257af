"""sasq-edge: static INT8 activation quantization with trained scales (SASQ, arXiv 2512.14481).

The method: quantizer math, module swap, calibration, scale training, smoothing, and the one
library entry ``run_sasq``::

    from sasq_edge import QuantConfig, load_model, run_sasq
    lm = load_model("HuggingFaceTB/SmolLM2-135M")
    result = run_sasq(lm, QuantConfig())
    result.state.save("run/")

The layers below it, ``exporters`` (ONNX lowering) and ``runtime`` (the torch-free device side),
never import this package; the command line (``sasq_edge.cli``) sits on top and nothing in the
method imports it. Names load lazily, so importing ``sasq_edge`` does not import torch.
"""

from runtime.version import __version__

_API = {
    "QuantConfig": "sasq_edge.config",
    "prepare": "sasq_edge.modules",
    "QuantLinear": "sasq_edge.modules",
    "calibrate": "sasq_edge.calibrate",
    "train_scales": "sasq_edge.train",
    "run_sasq": "sasq_edge.pipeline",
    "SasqResult": "sasq_edge.pipeline",
    "state_from_model": "sasq_edge.state",
    "apply_state": "sasq_edge.state",
    "ScaleState": "runtime.state",
    "PROFILES": "runtime.profiles",
    "load_model": "sasq_edge.models",
    "perplexity": "sasq_edge.evaluate",
    "SasqError": "runtime.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'sasq_edge' has no attribute {name!r}")
