"""Exporters: each reads an artifact and writes an artifact."""
