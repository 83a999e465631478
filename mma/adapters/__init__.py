"""Adapter methods. Importing this package registers every built-in method; recipes name a method by its settings
class (``adapter: LaVIN``, or ``class_path: mma.adapters.LaVIN`` with ``init_args``)."""

from mma.adapters.base import (
    AdapterMethod,
    AdapterModule,
    AdapterSettings,
    SourceBound,
    WrapsModule,
    adapter_parameter_names,
    get_adapter,
    method_of,
    register_adapter,
    register_fold,
    registered_adapters,
    set_train_mode,
    set_trainable_params,
    settings_from_spec,
    settings_spec,
)
from mma.adapters.lavin import LaVIN
from mma.adapters.llama_adapter_v2 import LlamaAdapterV2
from mma.adapters.lora import LoRA
from mma.adapters.memvp import MemVP
from mma.adapters.none import NoAdapter

__all__ = [
    "AdapterMethod",
    "AdapterModule",
    "AdapterSettings",
    "LaVIN",
    "LlamaAdapterV2",
    "LoRA",
    "MemVP",
    "NoAdapter",
    "SourceBound",
    "WrapsModule",
    "adapter_parameter_names",
    "get_adapter",
    "method_of",
    "register_adapter",
    "register_fold",
    "registered_adapters",
    "set_train_mode",
    "set_trainable_params",
    "settings_from_spec",
    "settings_spec",
]
