"""vlm-batch: VLMEvalKit evaluations through batched engines.

Importing this package loads no torch, vLLM or VLMEvalKit; those load where they are used.
"""

from .hookspecs import hookimpl
from .models import ModelCard, Unserved
from .request import Request, Result

__version__ = "0.1.0"
__all__ = ["ModelCard", "Request", "Result", "Unserved", "hookimpl", "__version__"]
