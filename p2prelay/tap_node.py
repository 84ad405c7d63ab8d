"""The ``twistd peernode`` tap module: what ServiceMaker loads by name."""

from .tap import NodeOptions as Options
from .tap import makeNodeService as makeService

__all__ = ["Options", "makeService"]
