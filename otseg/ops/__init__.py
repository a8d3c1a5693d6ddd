"""Operators: the Multi-Prompts Sinkhorn (``mps``), plain ``sinkhorn``, and the
backends behind them."""

from .mps import BackendStatus, SinkhornInfo, backends, mps, resolve_backend, sinkhorn

__all__ = ["sinkhorn", "mps", "backends", "resolve_backend", "BackendStatus", "SinkhornInfo"]
