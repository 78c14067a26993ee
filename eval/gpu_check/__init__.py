"""`make gpu-check`: every GPU measurement of the project in one command (see `run.py`)."""
