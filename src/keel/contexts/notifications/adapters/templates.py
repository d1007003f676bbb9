"""Email templates with Jinja2: a subject, a plain-text part and an HTML part (autoescaped) per kind."""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from keel.contexts.notifications.domain.model import EmailKind, Rendered, TemplateVars

TEMPLATE_DIR = Path(__file__).parent / "templates"


class JinjaTemplateRenderer:
    def __init__(self, directory: Path = TEMPLATE_DIR) -> None:
        self._env = Environment(
            loader=FileSystemLoader(directory),
            autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False),
            undefined=StrictUndefined,  # a missing value is a bug, not an empty string in a customer's inbox
            keep_trailing_newline=True,
        )

    def render(self, kind: EmailKind, values: TemplateVars) -> Rendered:
        name = kind.value
        return Rendered(
            subject=self._env.get_template(f"{name}.subject.txt").render(values).strip(),
            text=self._env.get_template(f"{name}.txt").render(values),
            html=self._env.get_template(f"{name}.html").render(values),
        )
