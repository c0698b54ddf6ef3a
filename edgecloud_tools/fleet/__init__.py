"""Operator tools for the fleet: release signing keys, publishing and rolling back releases, and a
view of the devices from their retained MQTT topics."""
