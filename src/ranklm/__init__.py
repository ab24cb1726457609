"""ranklm: low-rank compression of transformer LMs with adaptive rank selection.

``method = base decomposition x rank allocation x optional training``::

    import ranklm
    model = ranklm.compress(model, tokenizer, ranklm.CompressConfig(keep=0.8, recipe="svd-llm"))
    ranklm.save(model, tokenizer, "out/ckpt")
    model, tokenizer = ranklm.load("out/ckpt")
"""

__version__ = "0.1.0"

from .api import CompressionState, compress  # noqa: E402
from .config import RECIPES, CompressConfig  # noqa: E402
from .errors import RanklmError  # noqa: E402
from .io import export_dense, load, save  # noqa: E402
from .layers import LowRankLinear  # noqa: E402

__all__ = [
    "RECIPES",
    "CompressConfig",
    "CompressionState",
    "LowRankLinear",
    "RanklmError",
    "__version__",
    "compress",
    "export_dense",
    "load",
    "save",
]
