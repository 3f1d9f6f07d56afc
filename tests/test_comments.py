"""Comments and docs give the reason itself, never a pointer to a document the repository lacks.

A reader of the repository cannot follow "spec §6.6", "issue 6" or "bug #16": those name sections
of notes and trackers that are not shipped. A public reference that anyone can open (an sd-scripts
issue written as kohya-ss/sd-scripts#1304, a URL) is fine.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each pattern with an example it must catch. The patterns are assembled from pieces so that this
# file does not match itself.
SECTION = "\u00a7"
FORBIDDEN = {
    "a section sign (a numbered section of an outside document)": (SECTION, "spec " + SECTION + "6.6"),
    "a project issue or bug number": (r"\b(?:issue|bug)s?\s*#?\d", "see issue 6, item 5"),
    "a bare tracker number (write a public one as owner/repo#N)": (r"(?<![&\w/\-])(?<!sd-scripts)#\d{2,}\b",
                                                                   "its bug fix (#16)"),
    "the reference spec": (r"reference\s+spec|fine-tune-spec", "as the reference spec says"),
    "notes kept outside the repository": (r"environment-facts|DESIGN\.md|/work/shared|shared/reference|peer-bench",
                                          "see environment-facts " + SECTION + "2a"),
}


def _files():
    yield ROOT / "README.md"
    yield ROOT / "Makefile"
    for folder, pattern in (("src", "*.py"), ("docs", "*.md"), ("tests", "*.py"), ("bench", "*.py"),
                            ("scripts", "*.py")):
        for path in sorted((ROOT / folder).rglob(pattern)):
            if path.resolve() != Path(__file__).resolve():
                yield path


def _findings(text: str) -> list[str]:
    return [what for what, (pattern, _) in FORBIDDEN.items() if re.search(pattern, text, re.IGNORECASE)]


@pytest.mark.parametrize("what", list(FORBIDDEN))
def test_each_pattern_catches_its_example(what):
    pattern, example = FORBIDDEN[what]
    assert re.search(pattern, example, re.IGNORECASE)


def test_public_references_and_ordinary_text_pass():
    ok = ("(kohya-ss/sd-scripts#1304)", "https://github.com/kohya-ss/sd-scripts/issues/1709",
          "html entity &#39;x&#39;", "a known issue with fp16", "this bug is sd-scripts'", "tissue 5")
    for text in ok:
        assert _findings(text) == [], text


def test_no_reference_to_documents_outside_the_repository():
    bad = []
    for path in _files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for what in _findings(line):
                bad.append(f"{path.relative_to(ROOT)}:{number}: {what}: {line.strip()[:100]}")
    assert not bad, "say the reason itself instead:\n" + "\n".join(bad)
