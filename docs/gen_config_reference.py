"""Render the configuration reference (docs/reference/configuration.md) from the configs themselves.

Sources: conf/serve.yaml (the groups and their default options), every conf/<group>/<option>.yaml
(each key, the value it sets and its comment) and the framework's structured configs in
framework/settings.py (ServerConfig, TracingConfig: each field, its type, its default and its comment).

    python docs/gen_config_reference.py              # print the page (Markdown)
    python docs/gen_config_reference.py -o page.md   # write it to a file

The page is not committed: `mkdocs build` renders it afresh on every build (docs/hooks.py adds it to the
site as reference/configuration.md), so it cannot drift from conf/. A config file this script cannot
parse (or whose keys it reads differently from the YAML) fails the build, and so `make test`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import sys
import tokenize
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
SETTINGS = ROOT / "framework" / "settings.py"
PAGE = "reference/configuration.md"  # its path in the site (docs/hooks.py)

# The groups whose options are validated against framework/settings.py rather than a plugin's Config.
FRAMEWORK_GROUPS = {"server": "ServerConfig", "tracing": "TracingConfig"}


def split_comment(line: str) -> tuple[str, str | None]:
    """`key: value  # comment` -> (`key: value`, `comment`); a `#` inside quotes is not a comment."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), None


def cell(text: str) -> str:
    """Text for a table cell: `|` escaped, and `<`, `>`, `&` outside code spans (`<run folder>` is not HTML)."""
    parts = text.replace("\n", " ").split("`")
    for i in range(0, len(parts), 2):  # even parts are outside backticks
        parts[i] = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts).replace("|", "\\|")


def code(text: str) -> str:
    text = text.strip()
    if not text:
        return ""
    if "|" in text:  # a `\|` inside a code span stays a backslash in Python-Markdown's tables
        esc = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;")
        return f"<code>{esc}</code>"
    fence = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def parse_option(path: Path) -> dict:
    """One option file: its header comment, its defaults list, and blocks of (key, value, comment) rows.

    A comment line between keys starts a new block (e.g. `# store: disk` in conf/cache/semantic.yaml).
    Nested mappings are flattened to dotted keys; the keys found are checked against the YAML itself.
    """
    lines = path.read_text().splitlines()
    header, i, package = [], 0, None
    while i < len(lines) and lines[i].startswith("#"):
        text = lines[i][1:].strip()
        if text.startswith("@package "):
            package = text.removeprefix("@package ").strip()
        else:
            header.append(text)
        i += 1
    defaults: list[str] = []
    blocks: list[dict] = [{"note": None, "rows": []}]
    stack: list[tuple[int, str]] = []  # (indent, key) of the open parent mappings
    in_defaults = False
    for raw in lines[i:]:
        if not raw.strip():
            continue
        body, comment = split_comment(raw)
        indent = len(raw) - len(raw.lstrip())
        if not body.strip():  # a comment line of its own
            if in_defaults:
                continue
            if blocks[-1]["rows"] or blocks[-1]["note"]:
                blocks.append({"note": comment, "rows": []})
            else:
                blocks[-1]["note"] = comment
            continue
        stripped = body.strip()
        if stripped.startswith("- "):
            if in_defaults:
                defaults.append(stripped[2:].strip() + (f"  ({comment})" if comment else ""))
                continue
            if not stack:
                raise ValueError(f"{path}: a list item outside any key: {raw!r}")
            # A block list (`key:` then `- item` lines): one row, its items in flow style.
            full = ".".join(k for _, k in stack)
            rows = blocks[-1]["rows"]
            item = stripped[2:].strip()
            if rows and rows[-1][0] == full:
                key_, value_, comment_ = rows[-1]
                rows[-1] = (key_, f"[{value_[1:-1] + ', ' if value_ else ''}{item}]", comment_ or comment or "")
            else:
                rows.append((full, f"[{item}]", comment or ""))
            continue
        key, _, value = stripped.partition(":")
        value = value.strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if indent == 0 and key == "defaults" and not value:
            in_defaults = True
            continue
        in_defaults = False
        full = ".".join([k for _, k in stack] + [key])
        if not value:
            stack.append((indent, key))
            if comment:
                blocks[-1]["rows"].append((full, "", comment))
            continue
        blocks[-1]["rows"].append((full, value, comment or ""))
    loaded = yaml.safe_load(path.read_text()) or {}
    found = {r[0] for b in blocks for r in b["rows"] if r[1]}
    found |= {r[0] for b in blocks for r in b["rows"]} & set(flatten(loaded))  # an empty mapping or list
    expected = set(flatten({k: v for k, v in loaded.items() if k != "defaults"}))
    # A flow mapping (`key: {a: 1}`) is one row here but several keys in the YAML.
    missing = [e for e in expected if not any(e == f or e.startswith(f + ".") for f in found)]
    extra = [f for f in found if not any(e == f or e.startswith(f + ".") for e in expected)]
    if missing or extra:
        raise ValueError(f"{path}: parsed keys differ from the YAML's: missing {missing}, extra {extra}")
    return {"header": header, "package": package, "defaults": defaults, "blocks": blocks}


def flatten(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += flatten(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def primary_groups(name: str) -> list[tuple[str, str, str, bool]]:
    """(group, default option, comment, optional) from a primary config's defaults list, in its order."""
    out = []
    for raw in (CONF / name).read_text().splitlines():
        body, comment = split_comment(raw)
        s = body.strip()
        if not s.startswith("- ") or ":" not in s:  # `- _self_`, `- serve` (bench.yaml includes serve.yaml)
            continue
        entry = s[2:]
        optional = entry.startswith("optional ")
        group, _, option = entry.removeprefix("optional ").partition(":")
        out.append((group.strip(), option.strip(), comment or "", optional))
    return out


def dataclass_fields(class_name: str) -> list[tuple[str, str, str, str]]:
    """(name, type, default, comment) for each field of a dataclass in framework/settings.py.

    The comment is the field's trailing comment, else the comment lines right above it.
    """
    source = SETTINGS.read_text()
    comments = {tok.start[0]: tok.string[1:].strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == class_name)
    sys.path.insert(0, str(ROOT))
    try:
        import framework.settings as settings
    finally:
        sys.path.pop(0)
    defaults = {}
    for f in dataclasses.fields(getattr(settings, class_name)):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    out = []
    for node in cls.body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        name = node.target.id
        comment = comments.get(node.lineno)
        if comment is None:
            above, n = [], node.lineno - 1
            while n >= 1 and lines[n - 1].strip().startswith("#"):
                above.insert(0, comments[n])
                n -= 1
            comment = " ".join(above)
        out.append((name, ast.unparse(node.annotation), yaml_value(defaults.get(name)), comment))
    return out


def yaml_value(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def render() -> str:
    groups = primary_groups("serve.yaml")
    bench_groups = primary_groups("bench.yaml")
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by docs/gen_config_reference.py from conf/ and framework/settings.py: do not edit.",
        "     Every `mkdocs build` renders it afresh; `python docs/gen_config_reference.py` prints it. -->",
        "",
        "Every option of every config group: each key, the value the option sets and the comment beside it",
        "in its YAML file. Pick an option with `group=option` and change a key with `group.key=value`, e.g.",
        "`hydraserve serve cache=memory cache.max_bytes=67108864`; `hydraserve validate ... --cfg job` prints",
        "the composed config. This page is generated from the files themselves, so it says what they say.",
        "",
        "## Groups (`conf/serve.yaml`)",
        "",
        "| group | default | options | what it sets |",
        "| --- | --- | --- | --- |",
    ]
    for group, default, comment, optional in groups + bench_groups:
        options = ", ".join(f"[`{p.stem}`](#{group}{p.stem})" for p in sorted((CONF / group).glob("*.yaml")))
        shown = "none (optional)" if optional and default == "null" else f"`{default}`"
        where = " (`hydraserve bench`: `conf/bench.yaml`)" if group in {g for g, *_ in bench_groups} else ""
        out.append(f"| `{group}`{where} | {shown} | {options} | {cell(comment)} |")
    out += ["", "## Framework groups (`framework/settings.py`)", "",
            "`server` and `tracing` are validated against these dataclasses (a key they lack is an error); the",
            "YAML options below set some of the keys, and the dataclass default holds for the rest.", ""]
    for group, class_name in FRAMEWORK_GROUPS.items():
        out += [f"### `{group}`: `{class_name}`", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for name, typ, default, comment in dataclass_fields(class_name):
            out.append(f"| `{group}.{name}` | {code(typ)} | {code(default)} | {cell(comment)} |")
        out.append("")
    for group, *_ in groups + bench_groups:
        out += [f"## `{group}`", ""]
        for path in sorted((CONF / group).glob("*.yaml")):
            opt = parse_option(path)
            out += [f"### {group}={path.stem}", "",
                    f"`conf/{group}/{path.name}`" + (": " + cell(" ".join(opt["header"])) if opt["header"] else ""), ""]
            if opt["package"] == "_global_":
                out += ["`@package _global_`: its keys are top-level, so it sets keys of several groups.", ""]
            if opt["defaults"]:
                out += ["Defaults list: " + "; ".join(code(d) for d in opt["defaults"]) + ".", ""]
            for block in opt["blocks"]:
                if block["note"]:
                    out += [f"*{cell(block['note'])}*", ""]
                if block["rows"]:
                    out += ["| key | value | meaning |", "| --- | --- | --- |"]
                    prefix = "" if opt["package"] == "_global_" else f"{group}."
                    out += [f"| `{prefix}{k}` | {code(v)} | {cell(c)} |" for k, v, c in block["rows"]]
                    out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, help="write the page here instead of printing it")
    args = parser.parse_args(argv)
    page = render()
    if args.output:
        args.output.write_text(page)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
