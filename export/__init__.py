"""Workstation side of edgesparse: HF model -> package. Needs the [export] extra (torch, transformers)."""

from .exporter import export

__all__ = ["export"]
