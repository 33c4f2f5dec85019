"""What every daemon knows about the mesh: config and state, policy, metrics, and the daemon plumbing."""
