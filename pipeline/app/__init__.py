"""The application layer: the `touchpoint` command line and the commands it runs (setup, the demo and live view,
the bench, erasure, dead letters, the alerter and its admin)."""
