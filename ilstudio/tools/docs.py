"""The README's parameter tables, generated from the declarations (never hand-copied).

``python -m ilstudio.tools.docs`` prints them; ``--write README.md`` replaces the block
between the markers in place. A test fails when README and declarations disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ilstudio.config import settings as _settings  # noqa: F401  (registers configurables)
from ilstudio.config.declare import CONFIGURABLES, params_of, type_name
from ilstudio.config.hyperparams import HYPERPARAMS

BEGIN = "<!-- BEGIN GENERATED PARAMETER TABLES (python -m ilstudio.tools.docs --write README.md) -->"
END = "<!-- END GENERATED PARAMETER TABLES -->"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def stable_table() -> str:
    rows = ["| YAML key | gin binding | type | default | effect | policies | on resume |",
            "|---|---|---|---|---|---|---|"]
    for name in ("dataset", "model", "lora", "quantization"):
        for p in params_of(CONFIGURABLES[name]):
            if p.yaml_key is None:
                continue
            allowed = f" in `{p.bounds.text}`" if p.bounds else ""
            policies = ", ".join(p.policies) if p.policies is not None else "all"
            resume = "fixed" if p.breaks_resume else "may change"
            rows.append(f"| `{p.yaml_key}` | `{p.gin_key}` | {type_name(p.type)}{allowed} | "
                        f"`{p.default!r}` | {_cell(p.doc)} | {policies} | {resume} |")
    return "\n".join(rows)


def hyper_table() -> str:
    rows = ["| flag (= YAML key) | type | default | meaning |", "|---|---|---|---|"]
    for h in HYPERPARAMS:
        allowed = f" in `{h.bounds}`" if h.bounds else ""
        rows.append(f"| `--{h.name}` | {h.type.__name__}{allowed} | `{h.default!r}` | "
                    f"{_cell(h.doc)} |")
    return "\n".join(rows)


def generated_block() -> str:
    return "\n".join([
        BEGIN, "",
        "### Stable parameters (gin; YAML keys of the older files)", "", stable_table(), "",
        "### Hyperparameters (absl flags; also accepted as YAML keys)", "", hyper_table(), "",
        END,
    ])


def replace_block(text: str) -> str:
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + generated_block() + text[end:]


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == "--write":
        path = Path(argv[2])
        path.write_text(replace_block(path.read_text()))
        return 0
    print(generated_block())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
