"""Built-in model plugins: one module per plugin, each exposing its class as ``PLUGIN``."""
