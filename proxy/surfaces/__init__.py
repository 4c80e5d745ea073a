"""Client-facing API families: one module each."""
