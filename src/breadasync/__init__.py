"""breadasync: drive the Bread rollout API at scale from asyncio."""

from ._version import __version__

__all__ = ["__version__"]
