"""The documents: every relative link and image in README.md and docs/*.md
points at a file of the repository (and an anchor at a heading of that file),
every script the README names answers --help, and the README's results table
holds the committed scores."""

from __future__ import annotations

import json
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
    """The scripts the README names: stage files at the root, and the
    modules of the folders it runs with `python -m`."""
    text = (ROOT / "README.md").read_text()
    names = {n for n in re.findall(r"\b([a-z_]+\.py)\b", text) if (ROOT / n).is_file()}
    modules = set(re.findall(r"python -m ((?:bench|experiments|tools)\.[a-z_]+)", text))
    return sorted(names) + sorted(modules)


def test_readme_names_the_stages():
    assert {"collect_rollouts.py", "train_vae.py", "train_mdnrnn.py", "train_controller.py",
            "evaluate.py"} <= set(readme_scripts())


@pytest.mark.parametrize("script", readme_scripts())
def test_readme_script_help(script):
    result = run_script(*([script] if script.endswith(".py") else ["-m", script]), "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout


def test_the_readme_s_results_table_matches_the_committed_scores():
    """Each --json of the results block's commands is committed, and its mean
    ± std and IQM [95% CI] stand in the table, as evaluate.py prints them;
    every score in the table comes from one of those files."""
    block = (ROOT / "README.md").read_text().split("<!-- results:start -->")[1].split("<!-- results:end -->")[0]
    table, commands = block.split("```")[0], block.split("```")[1]
    paths = re.findall(r"--json (\S+)", commands)
    assert len(paths) == len(commands.strip().splitlines()), "a command of the results block has no --json"

    def number(x: float) -> str:
        return f"{x:.1f}".replace("-", "−")  # the table writes a minus sign

    cells = set()
    for path in paths:
        scores = json.loads((ROOT / path).read_text())
        assert scores["episodes"] == 100, path
        mean_std = f"{number(scores['mean'])} ± {number(scores['std'])}"
        iqm = f"{number(scores['iqm'])} [{number(scores['iqm_ci95'][0])}, {number(scores['iqm_ci95'][1])}]"
        assert mean_std in table and iqm in table, f"{path}: {mean_std}, IQM {iqm} not in the README's table"
        cells |= {mean_std, iqm}
    in_table = set(re.findall(r"−?\d+\.\d ± \d+\.\d|−?\d+\.\d \[−?\d+\.\d, −?\d+\.\d\]", table))
    assert in_table == cells, f"scores in the table that no committed JSON holds: {in_table - cells}"


def test_the_ppo_results_table_holds_the_committed_comparison():
    """docs/ppo.md's table holds every row experiments/compare_ppo.py wrote to
    checkpoints/ppo/comparison.md, as it wrote them, so they cannot drift."""
    doc = "docs/ppo.md"
    rows = (ROOT / "checkpoints/ppo/comparison.md").read_text().splitlines()
    lines = (ROOT / doc).read_text().splitlines()
    assert len(rows) > 2, "comparison.md holds no table; run experiments/compare_ppo.py"
    missing = [row for row in rows if row not in lines]
    assert not missing, f"{doc} lacks rows of checkpoints/ppo/comparison.md: {missing}"


def test_the_probe_table_matches_the_committed_json():
    """docs/probe.md's table is tools/probe.py's markdown of docs/probe.json,
    and its command is the one that wrote that file."""
    from tools.probe import markdown

    text = (ROOT / "docs/probe.md").read_text()
    result = json.loads((ROOT / "docs/probe.json").read_text())
    block = text.split("<!-- probe:start -->\n")[1].split("\n<!-- probe:end -->")[0]
    assert block == markdown(result["r2"]), "docs/probe.md's table differs from docs/probe.json; paste the probe's"
    assert f"--ckpt-dirs {result['config']['ckpt_dirs']} " in text


# Words about how the work was organised, which a user has no use for. The
# patterns are split so that this file does not match them itself.
WORK_WORDS = re.compile(r"\b(?:iss" r"ues?|sess" r"ions?|accel" r"erator|help" r"ers?)\b", re.I)


def product_files() -> list:
    """Every text file of the product: the documents, the scripts, the code,
    the tests, the CI script and .gitignore (not data/ or other ignored folders)."""
    skip = {"data", ".git", ".device-wheels", ".pytest_cache", "__pycache__", "tensorboard"}
    files = [p for suffix in ("*.md", "*.py", "*.sh", "*.ini", "*.txt") for p in ROOT.rglob(suffix)
             if not skip & set(p.relative_to(ROOT).parts)]
    return sorted(files) + [ROOT / ".gitignore", ROOT / ".ci" / "run"]


def test_no_word_of_how_the_work_was_organised(tmp_path):
    found = [f"{p.relative_to(ROOT)}:{i}: {m.group(0)}" for p in product_files()
             for i, line in enumerate(p.read_text().splitlines(), 1) for m in WORK_WORDS.finditer(line)]
    assert not found, "\n".join(found)
    planted = tmp_path / "planted.md"
    planted.write_text("As the is" "sue asked.\n")
    assert WORK_WORDS.search(planted.read_text())  # the test can fail
