"""Throughput and parity measurement commands."""
