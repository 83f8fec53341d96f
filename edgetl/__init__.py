"""edgetl: a labelled image folder to a verified int8 TFLite model on a Raspberry Pi or Coral.

Importing this package imports no TensorFlow; the heavy stages load it when they run.
"""

from edgetl.errors import EdgetlError, VerificationError

__version__ = "0.1.0"

__all__ = ["EdgetlError", "VerificationError", "__version__"]
