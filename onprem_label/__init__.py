"""onprem-label: an on-premise labeling server with full inspection, for sites that keep data in."""

__version__ = "0.1.0"
