"""Moved to `visionzoo.runtime.backends`; this name is kept so that existing imports keep working."""
from ..runtime.backends import *  # noqa: F401,F403
