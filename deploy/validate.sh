#!/usr/bin/env bash
# Validates the cluster manifests (deploy/kustomize/base) offline:
#   1. render them: `kubectl kustomize` when kubectl is installed, else a small Python fallback
#      that concatenates the resources kustomization.yaml lists (the base uses no kustomize
#      transformers, and the fallback refuses a kustomization that starts to);
#   2. validate every document against the Kubernetes $K8S_VERSION schemas, strictly (unknown
#      fields are errors), with the PyPI package kubernetes-validate (ships the schemas; no
#      cluster, no network);
#   3. check least privilege: each Role/ClusterRole grants exactly what kpx needs (the
#      controlplane: get/list/watch on services, endpointslices and nodes, create on tokenreviews
#      and subjectaccessreviews, get on pods in kpx-system; kpx-inspector: get/list/watch on
#      nodestates.kpx.io, bound to nobody), bindings name the controlplane's ServiceAccount only,
#      and the dataplane mounts no API token (only a projected token for audience kpx).
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

# Least privilege: every role grants exactly this, and nothing else exists.
RO = ["get", "list", "watch"]
EXPECTED = {
    ("ClusterRole", "", "kpx-controlplane"): {
        ("", "services"): RO, ("", "nodes"): RO, ("discovery.k8s.io", "endpointslices"): RO,
        ("authentication.k8s.io", "tokenreviews"): ["create"],
        ("authorization.k8s.io", "subjectaccessreviews"): ["create"],
    },
    ("Role", "kpx-system", "kpx-controlplane-pods"): {("", "pods"): ["get"]},
    ("ClusterRole", "", "kpx-inspector"): {("kpx.io", "nodestates"): RO},
}
BINDINGS = {("ClusterRoleBinding", "kpx-controlplane"): "kpx-controlplane", ("RoleBinding", "kpx-controlplane-pods"): "kpx-controlplane-pods"}
roles = {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d for d in docs if d["kind"] in ("ClusterRole", "Role")}
if set(roles) != set(EXPECTED):
    errors.append(f"roles {sorted(roles)}, expected exactly {sorted(EXPECTED)}")
for k, role in roles.items():
    if role.get("aggregationRule"):
        errors.append(f"{k[0]}/{k[2]}: aggregationRule grants whatever matches")
    granted = {}
    for rule in role.get("rules", []):
        if rule.get("nonResourceURLs"):
            errors.append(f"{k[0]}/{k[2]}: nonResourceURLs {rule['nonResourceURLs']}")
        for group in rule.get("apiGroups", []):
            for res in rule.get("resources", []):
                granted.setdefault((group, res), set()).update(rule.get("verbs", []))
    want = {gr: set(v) for gr, v in EXPECTED.get(k, {}).items()}
    for gr in sorted(set(granted) | set(want)):
        if granted.get(gr, set()) != want.get(gr, set()):
            errors.append(f"{k[0]}/{k[2]}: {gr[0] or 'core'}/{gr[1]} verbs {sorted(granted.get(gr, set()))}, expected {sorted(want.get(gr, set()))}")
for b in (d for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")):
    bk = (b["kind"], b["metadata"]["name"])
    if BINDINGS.get(bk) != b["roleRef"]["name"]:
        errors.append(f"{bk[0]}/{bk[1]}: binds role {b['roleRef']['name']}; expected bindings: {BINDINGS}")
    for s in b.get("subjects", []):
        if (s.get("kind"), s.get("name"), s.get("namespace")) != ("ServiceAccount", "kpx-controlplane", "kpx-system"):
            errors.append(f"{bk[0]}/{bk[1]}: binds {s}; only the controlplane's ServiceAccount may be bound")

# The dataplane needs no API access: no API token in its pods; its projected token is for kpx.
for d in docs:
    if d["kind"] == "DaemonSet" and d["metadata"]["name"] == "kpx-dataplane":
        spec = d["spec"]["template"]["spec"]
        if spec.get("automountServiceAccountToken") is not False:
            errors.append("DaemonSet/kpx-dataplane: automountServiceAccountToken must be false")
        for v in spec.get("volumes", []):
            for src in v.get("projected", {}).get("sources", []):
                token = src.get("serviceAccountToken")
                if token is not None and token.get("audience") in (None, "", "api", "https://kubernetes.default.svc", "https://kubernetes.default.svc.cluster.local"):
                    errors.append(f"DaemonSet/kpx-dataplane: volume {v['name']} projects a token the apiserver accepts")
    if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "kpx-dataplane":
        if d.get("automountServiceAccountToken") is not False:
            errors.append("ServiceAccount/kpx-dataplane: automountServiceAccountToken must be false")
    if d["kind"] in ("Deployment", "DaemonSet"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            if c.get("securityContext", {}).get("privileged"):
                errors.append(f"{d['kind']}/{d['metadata']['name']}: container {c['name']} is privileged")
            args = c.get("args", [])
            if "--insecure" in args:
                errors.append(f"{d['kind']}/{d['metadata']['name']}: container {c['name']} runs with --insecure")

for e in errors:
    print(f"FAIL {e}", file=sys.stderr)
if errors:
    sys.exit(1)
print(f"{len(docs)} documents valid; RBAC grants exactly what kpx needs")
PY
