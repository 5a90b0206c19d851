"""Exceptions raised by dhde. Every message is one line, meant for a user."""


class DHDEError(Exception):
    """Base class of all dhde errors."""


class ImageLoadError(DHDEError):
    """An input image is missing, unreadable, truncated or of an unsupported kind."""


class ImageTooSmallError(DHDEError):
    """An image is smaller than the smallest patch the method needs."""


class ModelError(DHDEError):
    """A model file is missing, malformed or incompatible."""


class NoModelError(ModelError):
    """No model was given and the package ships no default model."""
