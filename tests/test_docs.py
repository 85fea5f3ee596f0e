"""README.md and docs/ against the repository: every relative link and every path they name resolves
inside a clone, and they give the weights one layout, the one the Kubernetes manifests use."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\s]+)`")
TOP_LEVEL = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")}
FILE_SUFFIX = re.compile(r"\.(py|md|ya?ml|json|toml)$|/$")
WEIGHTS_PATH = re.compile(r"/models/[\w./-]*\w")


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", markdown, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def _broken_links(doc: Path, text: str) -> list[str]:
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.is_relative_to(ROOT) or not file.exists():
            broken.append(f"{doc.name}: {target} (no such file in the repository)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
            broken.append(f"{doc.name}: {target} (no such heading)")
    return broken


def _missing_paths(doc: Path, text: str) -> list[str]:
    """Repository paths named in code spans (`tests/test_x.py`); `<name>` and `*` are placeholders."""
    missing = []
    for token in CODE_SPAN.findall(text):
        if token.startswith("../"):
            missing.append(f"{doc.name}: `{token}` is outside the repository")
        elif token.split("/")[0] in TOP_LEVEL and "/" in token and FILE_SUFFIX.search(token):
            if not re.search(r"[<*]", token) and not (ROOT / token).exists():
                missing.append(f"{doc.name}: `{token}` does not exist")
    return missing


def test_every_relative_link_and_named_path_resolves_in_a_clone():
    problems = [p for doc in DOCS for p in _broken_links(doc, doc.read_text()) + _missing_paths(doc, doc.read_text())]
    assert problems == []


def test_the_checks_catch_a_dead_link_a_missing_path_and_a_path_outside():
    doc = ROOT / "docs" / "broken-example.md"  # judged as if it were in docs/, never written there
    text = ("[gone](nowhere.md) [out](../../etc/hosts) [bad](architecture.md#no-such-heading) "
            "[ok](architecture.md) `../shared/docs/x.md` `tests/test_nothing.py` `tests/test_docs.py`")
    assert _broken_links(doc, text) == [
        "broken-example.md: nowhere.md (no such file in the repository)",
        "broken-example.md: ../../etc/hosts (no such file in the repository)",
        "broken-example.md: architecture.md#no-such-heading (no such heading)",
    ]
    assert _missing_paths(doc, text) == ["broken-example.md: `../shared/docs/x.md` is outside the repository",
                                   "broken-example.md: `tests/test_nothing.py` does not exist"]


def _weights_env() -> dict[str, str]:
    """The weights settings of the RayService: the one layout of the weights volume."""
    rayservice = yaml.safe_load((ROOT / "k8s" / "base" / "rayservice.yaml").read_text())
    (worker,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = worker["template"]["spec"]
    (check,) = pod["initContainers"]  # checks the volume with the settings the server reads
    env, checked = ({e["name"]: e.get("value") for e in c["env"]} for c in (pod["containers"][0], check))
    layout = {k: env[k] for k in ("SRPO_MODEL_DIR", "SRPO_TRANSFORMER_FILE", "SRPO_SAFETY_DIR")}
    assert check["command"] == ["srpo", "check-weights"] and checked == layout
    return layout


def test_one_weights_layout_everywhere():
    layout = _weights_env()
    known = {"/models", *layout.values(), "/models/srpo/fp32/diffusion_pytorch_model.safetensors"}
    files = [*DOCS, ROOT / "serve_config.gpu.yaml", ROOT / "Dockerfile", *sorted((ROOT / "k8s").rglob("*.yaml"))]
    others = {f"{f.relative_to(ROOT)}: {p}" for f in files for p in WEIGHTS_PATH.findall(f.read_text())
              if p not in known and not p.startswith("/models/srpo/fp32")}
    assert others == set()
    for name, path in layout.items():  # each setting is shown with its path where people copy it from
        for f in (ROOT / "README.md", ROOT / "serve_config.gpu.yaml", ROOT / "docs" / "deploy-kubernetes.md"):
            assert f"{name}={path}" in f.read_text(), (f.name, name)
