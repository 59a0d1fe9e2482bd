"""Every rule example in docs/routing.md is valid."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from vannah_pipelines.routing.rules import Coercion, parse_rules

DOC = Path(__file__).resolve().parents[2] / "docs" / "routing.md"


def test_docs_routing_examples_parse() -> None:
    blocks = re.findall(r"```json\n(.*?)```", DOC.read_text(), flags=re.S)
    rules: list[dict[str, Any]] = []
    coercions = 0
    for block in blocks:
        try:
            parsed = json.loads(block)
        except ValueError:
            if block.lstrip().startswith('"coerce"'):
                Coercion.model_validate(json.loads("{" + block + "}")["coerce"])
                coercions += 1
            else:  # one rule per line
                rules += [json.loads(line) for line in block.splitlines() if line.strip()]
            continue
        if "rules" in parsed:
            rules += parsed["rules"]
        elif "name" in parsed:
            rules.append(parsed)
    named = {r["name"]: r for r in rules}
    assert len(parse_rules(list(named.values())).rules) >= 9
    assert coercions == 1
