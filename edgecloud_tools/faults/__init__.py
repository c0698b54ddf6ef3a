"""``edgecloud faults``: each fault the system promises to survive, played on loopback against real
services, with its figures and a verdict against the promise (RELIABILITY.md lists them)."""
