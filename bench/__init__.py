"""Benchmarks: a mock OpenAI upstream, a bare pass-through proxy (the floor) and a runner that compares
them with the gateway. Run with `python -m bench`; see bench/README.md."""
