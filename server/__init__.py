"""The service: fal's HTTP API and queue over any generation backend. No Ray here (see docs/architecture.md)."""
