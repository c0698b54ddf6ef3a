"""Model updates: follow the signed release desired for this device, stage it in a second slot, swap it
in while serving, watch it, and roll back on regression; the state that survives a restart."""
