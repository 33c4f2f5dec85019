"""The east-west gateway: terminates the outer tunnel of double HBONE, picks a local endpoint per stream,
and relays the inner (still encrypted) bytes to that endpoint's ztunnel without looking inside."""
