"""dhde: DHDE defocus estimation (Park, Tai, Cho, Kweon, CVPR 2017) in Python."""

__version__ = "0.1.0"

from .config import DHDEConfig
from .errors import DHDEError, ImageLoadError, ImageTooSmallError, ModelError, NoModelError
from .io import load_image
from .pipeline import DefocusEstimator, DefocusResult, estimate

__all__ = [
    "DHDEConfig",
    "DHDEError",
    "DefocusEstimator",
    "DefocusResult",
    "ImageLoadError",
    "ImageTooSmallError",
    "ModelError",
    "NoModelError",
    "__version__",
    "estimate",
    "load_image",
]
