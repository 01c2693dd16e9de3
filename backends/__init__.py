"""One adapter per framework, installed as ``xfer.backends``; each imports its framework."""
