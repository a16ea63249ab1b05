"""order-bridge: providers' callbacks in, confirmed order-status events out."""

__version__ = "0.1.0"
