"""Packaged Hydra configs (installed as ``hydraserve_conf``); see framework.config.conf_dir."""
