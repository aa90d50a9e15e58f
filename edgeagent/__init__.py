"""edgeagent: the call agent for Raspberry Pi field devices."""

__version__ = "0.1.0"
