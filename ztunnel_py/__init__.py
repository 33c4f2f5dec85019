"""ztunnel: the per-node L4 proxy. Captures workloads' outbound TCP, carries it over HBONE, and terminates
inbound HBONE for the workloads on its node."""
