"""Supervision of a deployment: start processes in order, watch them, restart failed stages, stop cleanly."""
