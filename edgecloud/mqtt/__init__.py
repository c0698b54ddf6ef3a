"""MQTT for the fleet: topic names (``topics``), the payload models (``payloads``) and the JSON Schemas
generated from them (``schemas``), and a paho-mqtt client that tells the truth about its connection
(``client``)."""
