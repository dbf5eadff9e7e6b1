"""The commands of cli.py, grouped by what they do."""
