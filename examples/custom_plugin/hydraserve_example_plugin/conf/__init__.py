"""Hydra configs this package adds to hydraserve's search path (entry point group ``hydraserve.conf``)."""
