"""End-to-end demos and the recipes of the models they ship: `interpkit demo`."""
