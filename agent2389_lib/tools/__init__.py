"""Tools the model may call: registry, validation, built-ins and command tools."""

from .registry import ToolRegistry, build_registry

__all__ = ["ToolRegistry", "build_registry"]
