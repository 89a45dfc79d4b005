#!/usr/bin/env bash
# Validates the cluster manifests (deploy/kustomize/base) offline:
#   1. render them: `kubectl kustomize` when kubectl is installed, else a small Python fallback
#      that concatenates the resources kustomization.yaml lists (the base uses no kustomize
#      transformers, and the fallback refuses a kustomization that starts to);
#   2. validate every document against the Kubernetes $K8S_VERSION schemas, strictly (unknown
#      fields are errors), with the PyPI package kubernetes-validate (ships the schemas; no
#      cluster, no network);
#   3. check least privilege: RBAC grants only get/list/watch on services, endpointslices and
#      nodes, to the controlplane's ServiceAccount only; the dataplane mounts no API token.
# Exit status: 0 valid, 1 invalid, 3 a tool is missing (python3 -m pip install kubernetes-validate).
# Usage: deploy/validate.sh [KUSTOMIZE_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-deploy/kustomize/base}"
K8S_VERSION="${K8S_VERSION:-1.33.0}"

if ! python3 -c 'import kubernetes_validate, yaml' 2>/dev/null; then
  echo "validate.sh: python3 with kubernetes-validate is needed (python3 -m pip install kubernetes-validate)" >&2
  exit 3
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# The fallback renderer; with kubectl it also runs, and both must yield the same objects.
python3 - "$dir" >"$tmp/fallback.yaml" <<'PY'
import os, sys, yaml
base = sys.argv[1]
with open(os.path.join(base, "kustomization.yaml")) as f:
    k = yaml.safe_load(f)
extra = set(k) - {"apiVersion", "kind", "resources"}
if extra:
    sys.exit(f"fallback renderer: kustomization.yaml uses {sorted(extra)}; only `resources` is supported")
for r in k["resources"]:
    with open(os.path.join(base, r)) as f:
        sys.stdout.write("---\n" + f.read())
PY

if command -v kubectl >/dev/null 2>&1; then
  echo "--- render: kubectl kustomize $dir"
  kubectl kustomize "$dir" >"$tmp/rendered.yaml"
else
  echo "--- render: kubectl not installed; concatenating the resources of $dir/kustomization.yaml"
  cp "$tmp/fallback.yaml" "$tmp/rendered.yaml"
fi

echo "--- validate against Kubernetes $K8S_VERSION (strict) and check RBAC"
python3 - "$tmp/rendered.yaml" "$tmp/fallback.yaml" "$K8S_VERSION" <<'PY'
import sys, yaml, kubernetes_validate

rendered, fallback, version = sys.argv[1:]
errors = []

def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]

def key(d):
    return (d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"])

docs = load(rendered)
if not docs:
    sys.exit("no documents rendered")
if sorted(map(key, docs)) != sorted(map(key, load(fallback))):
    errors.append(f"kubectl kustomize and the fallback renderer disagree: {sorted(map(key, docs))} vs {sorted(map(key, load(fallback)))}")

for d in docs:
    try:
        kubernetes_validate.validate(d, version, strict=True)
        print(f"ok  {d['kind']}/{d['metadata']['name']}")
    except kubernetes_validate.ValidationError as e:
        errors.append(f"{d['kind']}/{d['metadata']['name']}: {e.message} at {'.'.join(map(str, e.path))}")
    except Exception as e:  # unknown kind or version: as bad as invalid
        errors.append(f"{d['kind']}/{d['metadata']['name']}: {type(e).__name__}: {e}")

# Least privilege.
ALLOWED_VERBS = {"get", "list", "watch"}
ALLOWED = {("", "services"), ("", "nodes"), ("discovery.k8s.io", "endpointslices")}
granted = set()
roles = {d["metadata"]["name"]: d for d in docs if d["kind"] in ("ClusterRole", "Role")}
for name, role in roles.items():
    if role.get("aggregationRule"):
        errors.append(f"{role['kind']}/{name}: aggregationRule grants whatever matches")
    for rule in role.get("rules", []):
        if rule.get("nonResourceURLs"):
            errors.append(f"{role['kind']}/{name}: nonResourceURLs {rule['nonResourceURLs']}")
        bad_verbs = set(rule.get("verbs", [])) - ALLOWED_VERBS
        if bad_verbs:
            errors.append(f"{role['kind']}/{name}: verbs {sorted(bad_verbs)} (only get/list/watch)")
        for group in rule.get("apiGroups", []):
            for res in rule.get("resources", []):
                if (group, res) not in ALLOWED:
                    errors.append(f"{role['kind']}/{name}: resource {group or 'core'}/{res} not allowed")
                granted.add((group, res))
if granted != ALLOWED:
    errors.append(f"RBAC grants {sorted(granted)}, the controlplane needs exactly {sorted(ALLOWED)}")
for b in (d for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")):
    for s in b.get("subjects", []):
        if (s.get("kind"), s.get("name"), s.get("namespace")) != ("ServiceAccount", "kpx-controlplane", "kpx-system"):
            errors.append(f"{b['kind']}/{b['metadata']['name']}: binds {s}; only the controlplane's ServiceAccount may be bound")

# The dataplane needs no API access: no token in its pods.
for d in docs:
    if d["kind"] == "DaemonSet" and d["metadata"]["name"] == "kpx-dataplane":
        if d["spec"]["template"]["spec"].get("automountServiceAccountToken") is not False:
            errors.append("DaemonSet/kpx-dataplane: automountServiceAccountToken must be false")
    if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "kpx-dataplane":
        if d.get("automountServiceAccountToken") is not False:
            errors.append("ServiceAccount/kpx-dataplane: automountServiceAccountToken must be false")
    if d["kind"] in ("Deployment", "DaemonSet"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            if c.get("securityContext", {}).get("privileged"):
                errors.append(f"{d['kind']}/{d['metadata']['name']}: container {c['name']} is privileged")

for e in errors:
    print(f"FAIL {e}", file=sys.stderr)
if errors:
    sys.exit(1)
print(f"{len(docs)} documents valid; RBAC is get/list/watch on services, endpointslices, nodes only")
PY
