"""The waypoint: an L7 proxy that terminates HBONE, speaks HTTP/1.1 and HTTP/2 inside each tunnel, routes
every request on its own, and forwards it over HBONE (or double HBONE) to an endpoint (SPEC §6)."""
