"""Moved to `visionzoo.tasks.quantize`; this name is kept so that existing imports keep working."""
from ..tasks.quantize import *  # noqa: F401,F403
