from . import _library  # noqa: F401
