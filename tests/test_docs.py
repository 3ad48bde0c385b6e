"""The docs say what the code does: their examples load, every setting, problem type and
alert is documented, and every command-line option states its default.

These read the repository's own docs, so a setting or problem type added without its
documentation, or an example that drifted from the code, fails here.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from proxy import cli as proxy_cli
from proxy.config import Settings, load_settings
from proxy.problems import TITLES
from sample_backend import cli as backend_cli

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGURATION = REPO_ROOT / "docs" / "configuration.md"


def _yaml_block(text: str, after: str) -> str:
    """The first ```yaml block after the line `after`."""
    start = text.index("```yaml\n", text.index(after)) + len("```yaml\n")
    return text[start : text.index("```", start)]


def _reference_example(tmp_path: Path) -> str:
    """docs/configuration.md's full example, its secret file pointed at a real one."""
    secret = tmp_path / "key-hash"
    secret.write_text("0123456789abcdef" * 4 + "\n")
    text = _yaml_block(CONFIGURATION.read_text(), "## The file")
    path = tmp_path / "example.yaml"
    path.write_text(text.replace("/run/secrets/key-hash", str(secret)))
    return str(path)


def test_the_reference_example_is_accepted(tmp_path: Path) -> None:
    settings = load_settings(_reference_example(tmp_path), environ={})
    assert [r.name for r in settings.routes] == ["pay"]


def test_the_readme_example_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(_yaml_block((REPO_ROOT / "README.md").read_text(), "## Running it"))
    settings = load_settings(str(path), flags={"upstream": "http://127.0.0.1:9000"}, environ={})
    assert len(settings.routes) == 4


def _setting_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[str]:
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from _setting_paths(kind, (*prefix, name))
        else:
            yield ".".join((*prefix, name))


def _has(tree: Any, path: str) -> bool:
    for part in path.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def test_every_setting_is_in_the_reference_example(tmp_path: Path) -> None:
    tree = yaml.safe_load(Path(_reference_example(tmp_path)).read_text())
    alternatives = {"key_hash_secret": "key_hash_secret_file"}  # one of the two, not both
    missing = [
        path
        for path in _setting_paths(Settings)
        if not _has(tree, path) and not _has(tree, alternatives.get(path, path))
    ]
    assert not missing, f"settings missing from docs/configuration.md's example: {missing}"


def test_every_problem_type_is_documented() -> None:
    text = CONFIGURATION.read_text().split("## Answers the proxy makes itself", 1)[1]
    text = text.split("\n## ", 1)[0]
    missing = [name for name in TITLES if f"`{name}`" not in text]
    assert not missing, f"problem types missing from docs/configuration.md: {missing}"


def test_every_alert_rule_is_named_in_operations_md() -> None:
    rules = yaml.safe_load(
        (REPO_ROOT / "k8s/components/monitoring/prometheusrule.yaml").read_text()
    )
    names = [rule["alert"] for group in rules["spec"]["groups"] for rule in group["rules"]]
    table = (REPO_ROOT / "docs" / "operations.md").read_text().split("## Alerts", 1)[1]
    table = table.split("\n## ", 1)[0]
    assert names
    missing = [name for name in names if f"`{name}`" not in table]
    assert not missing, f"alert rules missing from docs/operations.md: {missing}"


def _parsers(parser: argparse.ArgumentParser, name: str) -> Iterator[tuple[str, Any]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


COMMANDS = [
    *_parsers(proxy_cli.build_parser(), "idempotency-proxy"),
    *_parsers(backend_cli.build_parser(), "sample-backend"),
]


@pytest.mark.parametrize(("command", "parser"), COMMANDS, ids=[c for c, _ in COMMANDS])
def test_every_option_explains_itself_with_its_default(command: str, parser: Any) -> None:
    vague = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        if isinstance(action, argparse._SubParsersAction) or not action.option_strings:
            continue
        text = re.sub(r"\s+", " ", action.help or "")
        if not re.search(r"\bdefault\b|\brequired\b", text) or text.startswith("("):
            vague.append(action.option_strings[0])
    assert not vague, f"{command}: options whose --help gives no default: {vague}"
