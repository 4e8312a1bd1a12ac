"""Fault-injection suite: real `cluster up` processes on loopback under crashes, stalls, partitions
and hostile clients. Every test is marked `faults` and `slow`; figures are printed with `-s` and
collected in docs/FAULTS.md."""
