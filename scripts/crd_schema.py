"""Turns a CustomResourceDefinition into a JSON Schema for check-jsonschema, one file per
served version: deploy/k8s/schemas/<group>/<kind>_<version>.json (lower-case kind).

    python scripts/crd_schema.py path/to/monitoring.coreos.com_podmonitors.yaml

The CRD's openAPIV3Schema with what Kubernetes' structural schemas mean but JSON Schema
does not say: `nullable` allows null, and an object that lists its properties (and does not
preserve unknown fields) allows no others, as `kubernetes-validate --strict` and the API
server's field validation treat them; apiVersion and kind must be the CRD's own. A pattern
with Go's case-insensitive flag `(?i)`, which ECMA-262 regexes (JSON Schema's) lack, gets
each letter as a class instead: `(?i)warn` → `[wW][aA][rR][nN]`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

OUT = Path(__file__).resolve().parent.parent / "deploy" / "k8s" / "schemas"


def ecma_pattern(pattern: str) -> str:
    if "(?i)" not in pattern:
        return pattern
    head, _, tail = pattern.partition("(?i)")
    return head + "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in tail)


def strict(node: Any) -> Any:
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: strict(value) for key, value in node.items()}
    if isinstance(node.get("pattern"), str):
        node["pattern"] = ecma_pattern(node["pattern"])
    if node.pop("nullable", False) and "type" in node:
        node["type"] = [node["type"], "null"]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        node["additionalProperties"] = False
    return node


def main(paths: list[str]) -> None:
    for path in paths:
        crd = yaml.safe_load(Path(path).read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = strict(version["schema"]["openAPIV3Schema"])
            schema["properties"]["apiVersion"] = {"enum": [f"{group}/{version['name']}"]}
            schema["properties"]["kind"] = {"enum": [kind]}
            schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind"})
            schema = {
                "$schema": "http://json-schema.org/draft-07/schema#",
                "title": f"{group}/{version['name']} {kind}",
                **schema,
            }
            out = OUT / group / f"{kind.lower()}_{version['name']}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
            print(out.relative_to(OUT.parent.parent.parent))


if __name__ == "__main__":
    main(sys.argv[1:])
