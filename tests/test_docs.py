"""The documents: every relative link and image in README.md and docs/*.md
points at a file of the repository (and an anchor at a heading of that file),
and every script the README names answers --help."""

from __future__ import annotations

import re

import pytest

from conftest import ROOT, run_script

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def anchors(path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def links(path) -> list[str]:
    return [t for t in LINK.findall(prose(path.read_text())) if not re.match(r"(https?|mailto):", t)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_and_images_exist(doc):
    assert links(doc), f"{doc.name}: no relative link found; is the pattern still right?"
    broken = []
    for target in links(doc):
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists() or ROOT not in [dest, *dest.parents]:
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: broken links {broken}"


def readme_scripts() -> list[str]:
    names = set(re.findall(r"\b([a-z_]+\.py)\b", (ROOT / "README.md").read_text()))
    return sorted(n for n in names if (ROOT / n).is_file())


def test_readme_names_the_stages():
    assert {"collect_rollouts.py", "train_vae.py", "train_mdnrnn.py", "train_controller.py",
            "evaluate.py"} <= set(readme_scripts())


@pytest.mark.parametrize("script", readme_scripts())
def test_readme_script_help(script):
    result = run_script(script, "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout
