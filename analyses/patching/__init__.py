"""Activation patching (exact, on the sweep engine) and attribution patching: config, sweep, results, `interpkit patch`."""
