"""The one place that loads TensorFlow, Keras 2 (tf_keras) and tfmot.

tensorflow-model-optimization only works with Keras 2, and TensorFlow picks Keras 2 only if
TF_USE_LEGACY_KERAS is set before its first import. Every other module imports from here,
inside functions, so that ``import edgetl`` stays free of TensorFlow.
"""

from __future__ import annotations

import os
import sys

if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    raise ImportError(
        "TensorFlow was imported before edgetl.keras without TF_USE_LEGACY_KERAS=1; "
        "import edgetl.keras first (tfmot needs Keras 2)"
    )
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # hide C++ info/warning spam, keep errors



def _quiet_stderr():
    """Silences the C++ start-up lines (absl, oneDNN, CUDA probing) that TensorFlow writes to
    file descriptor 2 on import and first use, which no setting turns off; edgetl's own errors
    must stay one line. EDGETL_TF_LOGS=1 keeps them."""
    import contextlib

    if os.environ.get("EDGETL_TF_LOGS"):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def redirect():
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all
            yield
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)

    return redirect()


with _quiet_stderr():
    import tensorflow as tf  # noqa: E402
    import tf_keras as keras  # noqa: E402
    import tensorflow_model_optimization as tfmot  # noqa: E402
    from edgetl import distribute as _distribute  # noqa: E402

    _distribute.at_startup(tf)  # CPU devices and a multi-worker strategy precede the first op
    tf.constant(0.0) + 0.0  # device discovery happens on first use; keep it inside the silence

tf.get_logger().setLevel("ERROR")


def versions() -> dict:
    """Versions of the training stack, recorded in every run and export."""
    import numpy as np

    from edgetl import __version__

    return {
        "edgetl": __version__,
        "tensorflow": tf.__version__,
        "tf_keras": keras.__version__,
        "tfmot": getattr(tfmot, "__version__", "unknown"),
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }


def quantize_scope():
    """Context in which saved QAT models can be loaded."""
    return tfmot.quantization.keras.quantize_scope()


__all__ = ["tf", "keras", "tfmot", "versions", "quantize_scope"]
