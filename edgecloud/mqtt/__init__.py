"""MQTT for the fleet: topic names (``topics``), payload builders (``payloads``) and a paho-mqtt
client that tells the truth about its connection (``client``)."""
