"""The serial link: a thin asyncio shell around the sans-I/O protocol."""

from .lease import LeaseKeeper
from .pen_link import LinkDown, LinkUp, PenLink, PenLinkConfig

__all__ = ["LeaseKeeper", "LinkDown", "LinkUp", "PenLink", "PenLinkConfig"]
