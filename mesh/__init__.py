"""ZeroMQ transport between workers and nodes, the gossip-synced key directory, DERP-native mesh."""
