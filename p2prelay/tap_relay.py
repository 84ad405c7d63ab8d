"""The ``twistd relay`` tap module: what ServiceMaker loads by name."""

from .tap import RelayOptions as Options
from .tap import makeRelayService as makeService

__all__ = ["Options", "makeService"]
