#!/usr/bin/env bash
# Writes the CycloneDX SBOM (JSON, CycloneDX 1.6) of what the images install: the root
# component agentplatform (pyproject.toml) and every pin of requirements/runtime.txt with its
# version, package URL and the SHA-256 of its files. cyclonedx-py (cyclonedx-bom, pinned in
# the dev extras) validates it against the CycloneDX schema; then every pin of the lock must
# be a component at that version. Offline (reads the lock, fetches nothing).
#   scripts/sbom.sh                  -> build/sbom/agentplatform.cdx.json
#   scripts/sbom.sh OUTPUT.json
# CI uploads it as the artifact "sbom" (.github/workflows/ci.yml, job deploy).
# shellcheck source=scripts/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
ensure_venv dev
cd "$ROOT" || exit 1

out="${1:-build/sbom/agentplatform.cdx.json}"
mkdir -p "$(dirname "$out")"
# The root component's dependency graph is not in a requirements file: cyclonedx-py warns.
PYTHONWARNINGS="ignore::UserWarning" cyclonedx-py requirements \
  --pyproject pyproject.toml --mc-type application --sv 1.6 --of JSON \
  --output-reproducible --validate -o "$out" requirements/runtime.txt
python - "$out" <<'PY'
import json, sys
from pathlib import Path

sys.path.insert(0, "scripts")
from check_locks import parse_lock

bom = json.loads(Path(sys.argv[1]).read_text())
assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.6", "not CycloneDX 1.6"
root = bom["metadata"]["component"]
assert (root["name"], root["type"]) == ("agentplatform", "application"), root
components = {c["purl"] for c in bom["components"]}
pins, _ = parse_lock(Path("requirements/runtime.txt").read_text())
missing = sorted(
    f"{p.name}=={p.version}"
    for p in pins.values()
    if f"pkg:pypi/{p.name}@{p.version}" not in components
)
assert not missing, f"pins of requirements/runtime.txt missing from the SBOM: {missing}"
unhashed = [
    c["name"]
    for c in bom["components"]
    if not any(r.get("hashes") for r in c.get("externalReferences", []))
]
assert not unhashed, f"components without hashes: {unhashed}"
print(f"SBOM {sys.argv[1]}: CycloneDX 1.6, {len(components)} components, every pin of the lock")
PY
