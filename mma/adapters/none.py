"""No adapter: only the projector (and nothing inside the backbones) trains.

The floor that adapter methods are compared against, in benchmarks and ablations.
"""

from dataclasses import dataclass

from mma.adapters.base import register_adapter


@dataclass
class NoAdapterConfig:
    """This method has no settings."""


@register_adapter("none", NoAdapterConfig)
def attach_none(model, config: NoAdapterConfig) -> None:
    """Attach nothing."""
