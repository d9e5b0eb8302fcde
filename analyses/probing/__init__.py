"""Linear probes per layer (prompt or entity splits, lengthwise) and V-probes: `interpkit probe`, `interpkit vprobe`."""
