"""Run time: the tails server (PyTriton), the dynamic split client, and a shaped network link."""
