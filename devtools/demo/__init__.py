"""``penctl demo``: the whole stack as local processes, with a scripted clinic."""

from .demo import Demo

__all__ = ["Demo"]
