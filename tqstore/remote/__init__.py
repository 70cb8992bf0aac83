"""The remote tier: block values in Redis or Redis Cluster, shared by daemons on many hosts,
behind each daemon's local store (tiers.py says how the two work together)."""
