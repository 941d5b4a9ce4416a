"""``lowrank finetune``: adapt a pretrained LLM to a domain with every method side by side.

transformers (and gguf, for GGUF files) are imported only when a model is loaded, rich and
matplotlib only when a report is made: ``pip install "lowrank[finetune]"`` brings them.
"""

from .data import DataError, Dataset, Example, builtin, from_file
from .model import ModelError
from .run import Job, UsageError, finetune

__all__ = ["Job", "finetune", "Dataset", "Example", "builtin", "from_file", "DataError", "ModelError", "UsageError"]
