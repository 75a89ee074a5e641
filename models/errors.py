"""Errors raised by the models package; callers split them by what they can do about them."""


class ModelsError(Exception):
    """Base class for every error of the models package."""


class InvalidModelConfig(ModelsError, ValueError):
    """A model config names an unsupported architecture, resolution, channel count or class list."""


class WeightsError(ModelsError):
    """Weights or their config could not be read: missing file, wrong keys or shapes, bad JSON."""


class DatasetError(ModelsError, ValueError):
    """A training data set is missing, malformed or too small."""
