"""The table of the authors' recipe values (tests/helpers/authors_recipes.yaml; other methods' authors
under a recipe's `repo`): loading, checking a
shipped config against it, and the Markdown docs/recipes.md shows. `python tests/helpers/recipe_table.py`
prints that Markdown (paste it into docs/recipes.md after editing the table);
`python tests/helpers/recipe_table.py eval` prints the evaluation configs' table (docs/evaluation.md,
'Published protocols'); `python tests/helpers/recipe_table.py docs/sela.md` (any method page) the tables of the
recipes whose `docs:` names that page (shown there instead of docs/recipes.md)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from repo_paths import REPO

TABLE_FILE = Path(__file__).parent / "authors_recipes.yaml"
RECIPES_DIR = REPO / "configs" / "pretrain"
EVAL_DIR = REPO / "configs" / "eval"
AUTHORS_REPO = "github.com/DanielShalam/BAM"
SCRIPT_PLACEHOLDER = "{script}"


def load_table(section: str = "recipes") -> dict[str, dict[str, Any]]:
    """Recipe file name -> {script, why, settings (flat list of rows)}; `section="eval_recipes"`:
    evaluation config -> {repo, settings}."""
    recipes = yaml.safe_load(TABLE_FILE.read_text())[section]
    for entry in recipes.values():
        entry["settings"] = [row for rows in entry["settings"] for row in (rows if isinstance(rows, list) else [rows])]
    return recipes


def config_value(config: dict[str, Any], dotted_key: str) -> Any:
    value: Any = config
    for part in dotted_key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"{dotted_key} (missing at {part!r})")
        value = value[part]
    return value


def expected_value(row: dict[str, Any]) -> Any:
    """What the recipe must hold: the bam value of a deviation, else the authors' value."""
    return row["bam"] if "bam" in row else row["authors"]


def _format(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_format(item) for item in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def _authors_rows(recipes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each key of the authors' recipes once, with the recipes it applies to."""
    rows: dict[str, dict[str, Any]] = {}
    for name, entry in recipes.items():
        if entry["script"] is None:
            continue
        for row in entry["settings"]:
            merged = rows.setdefault(row["key"], {**row, "recipes": []})
            merged["recipes"].append(name.removesuffix(".yaml"))
    return rows


def markdown() -> str:
    """docs/recipes.md's two tables: the authors' recipes against theirs, then ResNet-50's own choices."""
    recipes = load_table()
    scripts = ", ".join(f"`{Path(entry['script']).name}`" for entry in recipes.values() if entry["script"])
    every = {name.removesuffix(".yaml") for name, entry in recipes.items() if entry["script"]}
    lines = [
        f"Authors' values ({AUTHORS_REPO}; `{{script}}` is the recipe's slurm script: {scripts}) and bam's:",
        "",
        "| setting | authors | source | bam | why bam differs |",
        "|---|---|---|---|---|",
    ]
    for key, row in _authors_rows(recipes).items():
        scope = "" if set(row["recipes"]) == every else f" ({', '.join(row['recipes'])})"
        bam = _format(row["bam"]) if "bam" in row else "same"
        lines.append(f"| `{key}`{scope} | {_format(row['authors'])} | {row['source']} | {bam} | {row.get('reason', '')} |")
    for name, entry in recipes.items():
        if entry["script"] is None and entry["settings"] and "docs" not in entry:
            lines += ["", *(_method_authors_table(name, entry) if "repo" in entry else _own_choices_table(name, entry))]
    return "\n".join(lines)


def _own_choices_table(name: str, entry: dict[str, Any]) -> list[str]:
    lines = [f"`{name}`: {entry['why']}:", "", "| setting | bam | why |", "|---|---|---|"]
    return lines + [f"| `{row['key']}` | {_format(row['bam'])} | {row['reason']} |" for row in entry["settings"]]


def _method_authors_table(name: str, entry: dict[str, Any]) -> list[str]:
    """Another method's recipe: its authors' values with their source files in `entry['repo']`."""
    lines = [f"`{name}`: {entry['why']} ({entry['repo']}):", "",
             "| setting | authors | source | bam | why bam differs |", "|---|---|---|---|---|"]
    for row in entry["settings"]:
        bam = "same" if row.get("bam", row["authors"]) == row["authors"] and "reason" not in row else _format(row["bam"])
        lines.append(f"| `{row['key']}` | {_format(row['authors'])} | {row['source']} | {bam} | {row.get('reason', '')} |")
    return lines


def page_markdown(page: str) -> str:
    """The tables of the recipes whose `docs` entry is `page` (a method's page in docs/ shows its own
    recipes instead of docs/recipes.md)."""
    tables = [_method_authors_table(name, entry) for name, entry in load_table().items() if entry.get("docs") == page]
    return "\n\n".join("\n".join(table) for table in tables)


def eval_markdown() -> str:
    """docs/evaluation.md's table of the evaluation configs that reproduce a published protocol."""
    lines = ["| config | setting | published | source | bam | why bam differs |", "|---|---|---|---|---|---|"]
    for name, entry in load_table("eval_recipes").items():
        for row in entry["settings"]:
            bam = _format(row["bam"]) if "bam" in row else "same"
            lines.append(
                f"| `{name}` | `{row['key']}` | {_format(row['authors'])} | {entry['repo']}: {row['source']} | {bam} | "
                f"{row.get('reason', '')} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["eval"]:
        print(eval_markdown())
    else:
        print(page_markdown(sys.argv[1]) if sys.argv[1:] else markdown())
