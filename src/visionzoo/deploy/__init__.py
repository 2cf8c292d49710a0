"""Former home of the deployment tools, kept so that existing imports keep working.

The runtime library now lives in `visionzoo.runtime` (backends, export, export cache, metadata,
graph optimisation, measurement) and the workflows in `visionzoo.tasks` (quantize, prune, serve).
Import them from there; these modules re-export the same objects.
"""
