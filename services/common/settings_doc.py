"""Render every service's settings as a markdown table (``docs/configuration.md``), from the classes.

The settings classes are the single source: this keeps the documented environment variables equal to
the ones the code reads (a test compares the file with a fresh rendering).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic_settings import BaseSettings

from services.common.settings import ARTIFACTS_ENV

DOC_PATH = Path("docs/configuration.md")


def _settings_classes() -> list[tuple[str, type[BaseSettings]]]:
    from services.classifier.settings import ClassifierSettings
    from services.generator.settings import GeneratorSettings
    from services.retriever.settings import RetrieverSettings
    from services.router.settings import RouterSettings

    return [
        ("router", RouterSettings),
        ("classifier", ClassifierSettings),
        ("retriever", RetrieverSettings),
        ("generator", GeneratorSettings),
    ]


def env_name(settings_cls: type[BaseSettings], field_name: str) -> str:
    field = settings_cls.model_fields[field_name]
    if isinstance(field.validation_alias, str):
        return field.validation_alias
    return f"{settings_cls.model_config.get('env_prefix', '')}{field_name}".upper()


def env_names(settings_cls: type[BaseSettings]) -> set[str]:
    """Every environment variable a settings class reads."""
    return {env_name(settings_cls, name) for name in settings_cls.model_fields}


def _default(value: object) -> str:
    if value is None:
        return "(unset)"
    text = str(value)
    return f"`{text}`" if text else '`""`'


def render_settings_markdown() -> str:
    lines = [
        "# Configuration",
        "",
        "Every service reads its settings from environment variables (or a `.env` file in its working",
        f"directory). `{ARTIFACTS_ENV}` is shared by all services. This file is generated from the settings",
        "classes by `python -m services.common.settings_doc` (a test checks it is current).",
    ]
    for service, settings_cls in _settings_classes():
        lines += ["", f"## {service}", "", "| variable | default | meaning |", "|---|---|---|"]
        for name, field in settings_cls.model_fields.items():
            description = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{env_name(settings_cls, name)}` | {_default(field.default)} | {description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DOC_PATH
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_settings_markdown(), encoding="utf-8")
