"""Thin HTTP handlers, one file per protocol; the work is in serving.py and protocol/."""
