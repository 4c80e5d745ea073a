"""Guardrails: content checks applied to requests and responses by policy."""
