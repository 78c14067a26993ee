"""Experiments that measure each method's effect; each is the demo of its plugin."""
