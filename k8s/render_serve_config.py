"""Write each kustomization's serveConfigV2 from serve_config.gpu.yaml, the one source of truth.

    python -m k8s.render_serve_config           # rewrite the generated patches
    python -m k8s.render_serve_config --check   # exit 1 if one is stale

The GPU config's `applications` are copied as they are. An overlay may adapt them to its hardware
in `serve-overrides.yaml`: a mapping from deployment name to a partial deployment config, merged
key by key into that deployment (dicts merge, other values replace), on top of the base's own
`serve-overrides.yaml`. The result goes into
`serve-config.generated.yaml` beside it, a patch that sets the RayService's serveConfigV2.
`http_options` are dropped: KubeRay owns them (Serve on port 8000 of every Ray pod).
`proxy_location` is kept: HeadOnly, so the GPU pods (spot, preempted) never hold the HTTP entry
and the head pod is the serve Service's endpoint (docs/operations.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "serve_config.gpu.yaml"
BASE = ROOT / "k8s" / "base"
OVERRIDES = "serve-overrides.yaml"
GENERATED = "serve-config.generated.yaml"
RAYSERVICE_NAME = "srpo"


def targets() -> list[Path]:
    """The base, then every overlay that adapts the Serve config."""
    return [BASE, *sorted(p.parent for p in (ROOT / "k8s" / "overlays").glob(f"*/{OVERRIDES}"))]


def _merge(into: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = dict(into)
    for key, value in change.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def serve_config(overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """serve_config.gpu.yaml's applications with `overrides` merged into the named deployments."""
    source = yaml.safe_load(SOURCE.read_text())
    applications = source["applications"]
    overrides = dict(overrides or {})
    for app in applications:
        app["deployments"] = [_merge(d, overrides.pop(d["name"], {})) for d in app["deployments"]]
    if overrides:
        raise ValueError(f"overrides name deployments the config does not have: {sorted(overrides)}")
    return {"proxy_location": source["proxy_location"], "applications": applications}


def serve_config_for(kustomization: Path) -> dict[str, Any]:
    """The config of a kustomization: the base's overrides, then its own on top."""
    overrides: dict[str, dict[str, Any]] = {}
    for layer in dict.fromkeys([BASE, kustomization]):
        path = layer / OVERRIDES
        if path.exists():
            overrides = _merge(overrides, yaml.safe_load(path.read_text()))
    return serve_config(overrides)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, so the embedded config stays readable YAML."""


_Dumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)
)


def render(kustomization: Path) -> str:
    config = yaml.safe_dump(serve_config_for(kustomization), sort_keys=False)
    patch = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": RAYSERVICE_NAME},
        "spec": {"serveConfigV2": config},
    }
    source = f"serve_config.gpu.yaml + {OVERRIDES}" if (kustomization / OVERRIDES).exists() else "serve_config.gpu.yaml"
    header = f"# GENERATED from {source} by `python -m k8s.render_serve_config`: do not edit.\n"
    return header + yaml.dump(patch, Dumper=_Dumper, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale files instead of writing them")
    args = parser.parse_args(argv)
    stale = []
    for kustomization in targets():
        path, text = kustomization / GENERATED, render(kustomization)
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(text)
    for path in stale:
        print(f"{'stale' if args.check else 'wrote'}: {path.relative_to(ROOT)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
