"""The ``twistd relay`` tap module: what ServiceMaker loads by name."""

from .tap import RelayOptions as Options, makeRelayService as makeService

__all__ = ["Options", "makeService"]
