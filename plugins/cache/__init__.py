"""Built-in cache plugins: one module per plugin, each exposing its class as ``PLUGIN``."""
