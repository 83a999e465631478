"""No adapter: only the projector (and nothing inside the backbones) trains.

The floor that adapter methods are compared against, in benchmarks and ablations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from mma.adapters.base import AdapterSettings, register_adapter

if TYPE_CHECKING:
    from mma.model import VisionLanguageModel


@dataclass
class NoAdapter(AdapterSettings):
    """The projector alone; this method has no settings."""

    name: ClassVar[str] = "none"


@register_adapter(NoAdapter)
def attach_none(model: VisionLanguageModel, config: NoAdapter) -> None:
    """Attach nothing."""
