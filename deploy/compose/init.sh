#!/bin/sh
# The compose demo's one-shot `init` service: the mesh PKI and the generated mesh state, into the shared
# volume that every daemon mounts read-only.
#
#   $MESH_DIR/config/<cluster>.yaml   python -m topology.generate (rewritten on every start: edit the topology)
#   $MESH_DIR/pki/root/               python -m certs root         (kept once made, so certificates stay valid)
#   $MESH_DIR/pki/<cluster>/          python -m certs cluster      (Istio's cacerts layout: CA_CERTS_DIR)
set -eu

out=${MESH_DIR:-/var/lib/ambient}
topology=${TOPOLOGY:-/deploy/topology.yaml}
python=${PYTHON:-python}

clusters=$("$python" -m topology.generate "$topology" "$out/config" --mode netns)
echo "$clusters"
if [ ! -f "$out/pki/root/root-cert.pem" ]; then
    "$python" -m certs root --out "$out/pki/root"
fi
# generate prints one "<cluster>: <path>" line per cluster
for cluster in $(echo "$clusters" | cut -d: -f1); do
    if [ ! -f "$out/pki/$cluster/ca-cert.pem" ]; then
        "$python" -m certs cluster --root "$out/pki/root" --name "$cluster" --out "$out/pki/$cluster"
    fi
done
echo "mesh state and PKI ready in $out"
