"""The documentation: the mkdocs site builds in strict mode, and every page the README, the code,
the configs and the tests name exists.

Strict mode turns mkdocs' warnings into a failed build; `mkdocs.yml`'s `validation` raises broken
links and anchors between pages, links out of `docs/` and pages missing from the nav to warnings,
so each of them fails here with mkdocs' own message. The README is not part of the site (it is the
repository's front page), so its links into `docs/` are checked against the built pages here.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from mkdocs.commands.build import build
from mkdocs.config import load_config
from mkdocs.exceptions import Abort

from repo_paths import REPO

README_LINK = re.compile(r"\]\((docs/[^)#\s]+\.md)(?:#([^)\s]+))?\)")
NAMED_PAGE = re.compile(r"\bdocs/[\w-]+\.md\b")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built from this checkout, in strict mode; a warning fails with mkdocs' messages."""
    site_dir = tmp_path_factory.mktemp("site")
    config = load_config(str(REPO / "mkdocs.yml"), strict=True, site_dir=str(site_dir))
    warnings = _Collect()
    logging.getLogger("mkdocs").addHandler(warnings)
    try:
        build(config)
    except Abort as aborted:
        pytest.fail(f"{aborted}\n" + "\n".join(warnings.messages), pytrace=False)
    finally:
        logging.getLogger("mkdocs").removeHandler(warnings)
    return site_dir


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_site_builds_in_strict_mode(site):
    assert (site / "index.html").is_file()


def test_readme_links_lead_to_built_pages_and_their_headings(site):
    links = README_LINK.findall((REPO / "README.md").read_text())
    assert links, "the README links to no docs page"
    broken = [f"{page}#{anchor}" if anchor else page for page, anchor in links
              if not _page_has(site, page, anchor)]
    assert not broken, f"README links to pages or headings that the site lacks: {broken}"


def _page_has(site: Path, page: str, anchor: str) -> bool:
    """Whether the page was built and, when an anchor is given, has an element with that id."""
    name = Path(page).stem
    html = site / ("index.html" if name == "index" else f"{name}/index.html")
    return html.is_file() and (not anchor or f'id="{anchor}"' in html.read_text())


def test_every_docs_page_named_in_code_configs_and_tests_exists():
    sources = [*REPO.glob("bam/**/*.py"), *REPO.glob("configs/**/*.yaml"), *REPO.glob("tests/**/*.py"),
               *REPO.glob("launch/*"), *REPO.glob("scripts/*")]
    missing = sorted({f"{path.relative_to(REPO)}: {name}" for path in sources if path.is_file()
                      for name in NAMED_PAGE.findall(path.read_text(errors="replace"))
                      if not (REPO / name).is_file()})
    assert not missing, f"these name docs pages that do not exist: {missing}"


def test_ci_runs_exactly_the_readmes_test_command():
    """CI (`.ci/run`) must run the README's command 2 as written: a README command that CI never
    runs can rot, and a CI command users never see hides what green means."""
    first_block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    readme_test = [line for line in first_block.splitlines() if "pytest" in line]
    ci_test = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert readme_test == ci_test and len(ci_test) == 1, (readme_test, ci_test)
