"""Benchmarks of token-vault-mcp against the `mcp` SDK's own floor. Run `python -m bench` (see README)."""
