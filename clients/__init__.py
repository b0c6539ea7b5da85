"""Clients of the duplex gateway (no torch): `python -m clients` streams a file and saves the reply."""
