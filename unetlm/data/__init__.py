"""Byte data: document sources, packing into static-shape batches with boundaries."""
