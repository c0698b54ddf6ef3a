"""The edge agent: serves the edge model over KServe v2 and escalates uncertain rows to the cloud."""
