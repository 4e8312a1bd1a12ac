"""Operators' tools apart from the relay: `probe` (is a DERP node really relaying?) and `bench`
(throughput and latency of a running cluster). `cluster probe` and `cluster bench` dispatch here."""
