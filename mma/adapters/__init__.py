"""Adapter methods. Importing this package registers every built-in method."""

from mma.adapters import lavin, llama_adapter_v2, lora, none
from mma.adapters.base import (
    AdapterMethod,
    AdapterModule,
    adapter_parameter_names,
    get_adapter,
    register_adapter,
    registered_adapters,
    set_train_mode,
    set_trainable_params,
)

__all__ = [
    "AdapterMethod",
    "AdapterModule",
    "adapter_parameter_names",
    "get_adapter",
    "lavin",
    "llama_adapter_v2",
    "lora",
    "none",
    "register_adapter",
    "registered_adapters",
    "set_train_mode",
    "set_trainable_params",
]
