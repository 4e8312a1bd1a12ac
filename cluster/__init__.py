"""The `cluster` command: configuration, supervisor of workers, status, derpmap, probe and bench."""
