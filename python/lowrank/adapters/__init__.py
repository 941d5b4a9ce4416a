"""The adapter pattern for whole models: inject adapters of any method into any ``nn.Module``, keep
several by name, switch, disable, merge, unload, save and load them (PEFT's file format).

    model = lowrank.inject(model, lowrank.LoRAConfig(r=16, alpha=32, target_modules="all-linear"))
    ...train...
    lowrank.save_adapter(model, "out/my-adapter")
    lowrank.load_adapter(model, "out/other-adapter", adapter_name="other")
    lowrank.set_adapter(model, "other")
"""

from .config import AdapterConfig, FullConfig, LoRAConfig, QLoRAConfig, VeRAConfig
from .files import AdapterFileError, adapter_state_dict, load_adapter, read_adapter, save_adapter
from .layer import AdaptedLinear, FullDelta, LoRA, ModulesToSave, VeRA
from .mixed import mixed_batch
from .model import (
    TrainableSummary,
    active_adapter,
    adapted_layers,
    adapter_config,
    adapter_names,
    adapter_parameters,
    delete_adapter,
    disable_adapters,
    inject,
    merge,
    merge_and_unload,
    quantize_linear,
    quantize_model,
    set_adapter,
    trainable_summary,
    unmerge,
)

__all__ = [
    "AdapterConfig", "LoRAConfig", "QLoRAConfig", "VeRAConfig", "FullConfig",
    "AdaptedLinear", "LoRA", "VeRA", "FullDelta", "ModulesToSave",
    "inject", "quantize_model", "quantize_linear",
    "set_adapter", "active_adapter", "adapter_names", "adapter_config", "delete_adapter", "disable_adapters",
    "merge", "unmerge", "merge_and_unload", "mixed_batch",
    "adapter_parameters", "trainable_summary", "TrainableSummary", "adapted_layers",
    "save_adapter", "load_adapter", "read_adapter", "adapter_state_dict", "AdapterFileError",
]  # fmt: skip
