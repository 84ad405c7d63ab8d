"""The ``twistd peernode`` tap module: what ServiceMaker loads by name."""

from .tap import NodeOptions as Options, makeNodeService as makeService

__all__ = ["Options", "makeService"]
