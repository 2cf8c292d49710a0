"""Moved to `visionzoo.tasks.prune`; this name is kept so that existing imports keep working."""
from ..tasks.prune import *  # noqa: F401,F403
