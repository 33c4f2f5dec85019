"""One readable topology file → the per-cluster mesh configs, real isolated networks, and running processes.

- `spec`       the typed topology (clusters, networks, gateways, waypoints, apps, services)
- `loader`     YAML → `Topology`, refusing unknown keys and inconsistencies with the file and key path
- `addressing` every address of a topology, for network namespaces or for loopback
- `generate`   istiod's job: the mesh state file of each cluster (`python -m topology.generate`)
- `netns`      network namespaces + veth pairs: overlapping pod ranges joined only through the gateways
- `launch`     start a whole topology as processes, `curl` through it, scrape it (`python -m topology.launch`)
- `app`        the sample HTTP/TCP app the topologies run (`python -m topology.app`)
"""
