"""The agent in its fleet and its plant: MQTT presence, telemetry, system health and local /metrics."""
