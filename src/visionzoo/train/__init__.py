"""Fine-tuning machinery: configuration, data order, stage map, the loop, checkpoints,
the strategy probe and the torchrun glue. `tasks/finetune.py` puts them together."""
from .config import FinetuneConfig, Precision, Strategy

__all__ = ["FinetuneConfig", "Precision", "Strategy"]
