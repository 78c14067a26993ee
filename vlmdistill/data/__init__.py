"""Local data for demos and experiments: nothing here downloads anything."""
