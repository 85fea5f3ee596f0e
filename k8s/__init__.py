"""Offline tooling for the KubeRay manifests in this folder: serveConfigV2 generation and validation."""
