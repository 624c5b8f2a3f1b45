"""agent2389: a Python agent for the 2389 Agent Protocol."""

__version__ = "0.1.0"
