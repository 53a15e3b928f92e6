"""MkDocs hook: adds the configuration reference, rendered from conf/ and framework/settings.py on every build.

The page is never committed, so it cannot go stale; see docs/gen_config_reference.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mkdocs.structure.files import File, Files

_script = Path(__file__).with_name("gen_config_reference.py")
_spec = importlib.util.spec_from_file_location("gen_config_reference", _script)
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)


def on_files(files: Files, config) -> Files:
    stale = files.get_file_from_path(gen.PAGE)
    if stale is not None:  # a copy someone wrote with -o: the fresh render wins
        files.remove(stale)
    files.append(File.generated(config, gen.PAGE, content=gen.render()))
    return files
