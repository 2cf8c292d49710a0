"""Moved to `visionzoo.tasks.serve`; this name is kept so that existing imports keep working."""
from ..tasks.serve import *  # noqa: F401,F403
