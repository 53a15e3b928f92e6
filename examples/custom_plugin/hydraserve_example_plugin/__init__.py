"""An example hydraserve plugin package: adds ``model=reverse`` through entry points."""

__version__ = "0.1.0"
