"""Model updates: follow the signed release desired for this device, stage it in a second slot, swap it
in while serving, watch it, and roll back on regression; the state that survives a restart.

A release becomes the serving model in ``apply.py``; ``updater.py`` composes the parts and says where
each one lives."""
