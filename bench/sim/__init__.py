"""Discrete-event simulator of a splitserve cluster (see bench/simulator.py for the CLI)."""
