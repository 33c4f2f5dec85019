"""`make demo`: a two-cluster, two-network mesh on this machine, traffic through it with curl, and a table of
who talked to whom — once with AMBIENT_ENABLE_BAGGAGE off and once on."""
