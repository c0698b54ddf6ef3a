"""Serving: the cascade that answers every call, the model slot it reads from, and its counters."""
