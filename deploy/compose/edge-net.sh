#!/bin/sh
# A network's edge (the compose services `cluster<N>-edge`; the east-west gateway joins it with
# `network_mode: service:...`): the router between the network and the transit link, like the edge
# namespaces of topology/netns.py and like a cloud's NAT and load balancer.
# - GATEWAY_ADDR (e.g. 198.18.0.1/24) is the gateway's public address on the transit link. It is added
#   here, outside the link's Docker subnet: Docker drops packets routed to an address it assigned on
#   another bridge, and a load balancer's IP is not the node's anyway.
# - Traffic from the network to the transit range is forwarded and masqueraded; from the transit link
#   only answers come back in. The gateway's own port 15008 needs no forwarding: it listens here.
# Needs NET_ADMIN and net.ipv4.ip_forward=1. Signals readiness with $READY_FILE (/tmp/ready), then waits
# for SIGTERM.
set -eu

dev_of() { ip -o -4 addr show | awk -v want="$1" '{ split($4, a, "/"); if (a[1] == want) print $2 }'; }

inner=$(dev_of "$ROUTER_IP")
link=$(dev_of "$LINK_IP")
[ -n "$inner" ] && [ -n "$link" ] || { echo "edge-net: no interface with $ROUTER_IP or $LINK_IP" >&2; exit 1; }
ip addr replace "$GATEWAY_ADDR" dev "$link"
ip route del default 2>/dev/null || true
iptables -P FORWARD DROP
iptables -A FORWARD -i "$inner" -o "$link" -j ACCEPT
iptables -A FORWARD -i "$link" -o "$inner" -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
iptables -t nat -A POSTROUTING -o "$link" -j MASQUERADE
echo "edge-net: $inner $ROUTER_IP <-> $link $LINK_IP + $GATEWAY_ADDR (masquerade)"
touch "${READY_FILE:-/tmp/ready}"

trap 'exit 0' TERM INT
sleep infinity &
wait $!
