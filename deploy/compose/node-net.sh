#!/bin/sh
# A node's network namespace (the compose services `cluster<N>-node`; ztunnel, the waypoint and the apps of
# the node join it with `network_mode: service:...`). Like a Kubernetes node with its pods, and like
# topology/netns.py's node namespaces:
# - every pod of the node gets its own address (POD_IPS) next to the node's (NODE_IP, assigned by Docker),
#   so ztunnel in shared mode knows each app by its source address, and each app listens on its own IP;
# - the transit range (TRANSIT_CIDR, where the east-west gateways are) is reached through the network's
#   edge (EDGE_IP); there is no default route, so nothing else outside the network is reachable.
# Needs NET_ADMIN. Signals readiness with $READY_FILE (/tmp/ready), then waits for SIGTERM.
set -eu

dev_of() { ip -o -4 addr show | awk -v want="$1" '{ split($4, a, "/"); if (a[1] == want) print $2 }'; }

dev=$(dev_of "$NODE_IP")
[ -n "$dev" ] || { echo "node-net: no interface has $NODE_IP" >&2; exit 1; }
for ip in $POD_IPS; do
    ip addr replace "$ip/32" dev "$dev"
done
ip route del default 2>/dev/null || true
ip route replace "$TRANSIT_CIDR" via "$EDGE_IP" dev "$dev"
echo "node-net: $dev $NODE_IP, pods $POD_IPS; $TRANSIT_CIDR via $EDGE_IP"
ip -4 addr show dev "$dev"
touch "${READY_FILE:-/tmp/ready}"

trap 'exit 0' TERM INT
sleep infinity &
wait $!
