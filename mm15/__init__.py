"""mm15: fine-tuning suite for MM1.5-style multimodal LLMs.

The repository keeps a flat layout (`base/`, `video/`, `ui/`, `data_builders/`); an install maps
them to `mm15.base`, `mm15.video`, `mm15.ui` and `mm15.data_builders`. When the package is imported
straight from a checkout (no install), the repository root is added to this package's search path
so the same names resolve.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

_root = _Path(__file__).resolve().parent.parent
if (_root / "base" / "__init__.py").exists() and str(_root) not in __path__:
    __path__.append(str(_root))
