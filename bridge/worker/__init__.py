"""The confirmation worker: inbox hints in, status events (or dead letters) out."""

from bridge.worker.consumer import Worker

__all__ = ["Worker"]
