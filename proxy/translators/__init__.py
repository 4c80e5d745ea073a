"""Translators between client surfaces and provider kinds: one module per provider kind."""
