"""Moved to `visionzoo.runtime.export`; this name is kept so that existing imports keep working."""
from ..runtime.export import *  # noqa: F401,F403
