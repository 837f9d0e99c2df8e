"""Generate click options from the pydantic RunConfig, so every config field is a CLI flag.

Top-level fields become ``--field-name``; section fields become ``--<section>-<field-name>``
(``--semalign-top-k-layers``, ``--frontier-layer-loss``). Only flags the user gives override the config file
and defaults (options default to ``None``).
"""

from __future__ import annotations

import typing
from typing import Any, Literal

import click
from pydantic import BaseModel

from ..config import RunConfig, Section


def _click_type(annotation: Any):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or str(origin) == "types.UnionType":
        inner = [a for a in args if a is not type(None)]
        return _click_type(inner[0])
    if origin is Literal:
        return click.Choice([str(a) for a in args])
    return {int: int, float: float, str: str, bool: bool}.get(annotation, str)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def config_options() -> list[tuple[click.Option, tuple[str, ...]]]:
    """(click option, path into the config) for every field."""
    opts: list[tuple[click.Option, tuple[str, ...]]] = []

    def add(field_name: str, info, path: tuple[str, ...], prefix: str, section_doc: str = "") -> None:
        ann = info.annotation
        ctype = _click_type(ann)
        flag = _flag(prefix + field_name)
        dest = "__".join(path)
        default = info.default if info.default is not None else None
        doc = (info.description or "").strip()
        helptext = f"{section_doc}{doc} [default: {default}]" if default is not None or doc else section_doc
        if ctype is bool:
            neg = "--no-" + flag[2:]
            opts.append((click.Option([f"{flag}/{neg}", dest], default=None, help=helptext), path))
        else:
            opts.append((click.Option([flag, dest], type=ctype, default=None, help=helptext), path))

    for name, info in RunConfig.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            doc = (ann.__doc__ or "").strip().splitlines()[0]
            tag = "[RECONSTRUCTION] " if name == "frontier" else ""
            for sub, sinfo in ann.model_fields.items():
                add(sub, sinfo, (name, sub), f"{name}_", f"{tag}({doc.split(':')[0].rstrip('.')}) ")
        else:
            add(name, info, (name,), "")
    return opts


def apply_overrides(base: dict, params: dict, options: list[tuple[click.Option, tuple[str, ...]]]) -> dict:
    """Set every non-None CLI value into the nested ``base`` dict."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for opt, path in options:
        val = params.get(opt.name)
        if val is None:
            continue
        d = out
        for key in path[:-1]:
            d = d.setdefault(key, {})
        d[path[-1]] = val
    return out


def model_fields_doc(model: type[BaseModel]) -> str:
    return "\n".join(f"{n}: {i.description or ''}" for n, i in model.model_fields.items())
