"""Pin the course to a release: what `make release TAG=v0.2.0 [REPOSITORY=https://github.com/you/fork]` runs.

    python scripts/release.py --tag v0.2.0
    python scripts/release.py --tag v0.2.0 --repository https://github.com/my-university/vit-course
    python scripts/release.py --check      # exit 1 if a notebook or the README disagrees with release.toml

It writes release.toml and rewrites, in every lecture and solution (`.md` and `.ipynb`) and in
the README, the two places that name the release: the Colab install cell
(`%pip install -q "vit-course @ git+REPOSITORY@TAG"`) and the "Open in Colab" badges
(`https://colab.research.google.com/github/OWNER/NAME/blob/TAG/...`). `make release` then
regenerates the notebooks and the labs from them. Publish by committing, tagging the commit with
TAG and pushing both (README, "Publishing a release").
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from grading.notebooks import Release, read_release  # noqa: E402

INSTALL = re.compile(r"vit-course @ git\+https://github\.com/[\w.-]+/[\w.-]+(?:@[\w.-]+)?")
BADGE = re.compile(r"https://colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/[\w.-]+/(?=(?:lectures|labs|solutions)/)")


def sources(root: Path = ROOT) -> list[Path]:
    """The files that name the release: the README and the lectures and solutions, `.md` sources
    and `.ipynb` copies (rewritten in place, so the solutions keep their outputs; labs/ is
    generated from solutions/)."""
    return [root / "README.md", *(p for folder in ("lectures", "solutions") for ext in ("md", "ipynb")
                                  for p in sorted((root / folder).glob(f"*.{ext}")))]


def pin(text: str, release: Release) -> str:
    text = INSTALL.sub(f"vit-course @ {release.pip_url}", text)
    return BADGE.sub(f"https://colab.research.google.com/github/{release.github}/blob/{release.tag}/", text)


def disagreements(release: Release, root: Path = ROOT) -> list[str]:
    """Install cells and badges that name another repository or tag than release.toml."""
    found = []
    for path in [*sources(root), *sorted((root / "labs").glob("*.*"))]:
        text = path.read_text()
        for m in [*INSTALL.finditer(text), *BADGE.finditer(text)]:
            if pin(m.group(0), release) != m.group(0):
                found.append(f"{path.relative_to(root)}: {m.group(0)}")
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tag", help="the git tag the release will have, e.g. v0.2.0")
    p.add_argument("--repository", help="https://github.com/OWNER/NAME (default: release.toml's)")
    p.add_argument("--check", action="store_true", help="only check that every notebook agrees with release.toml")
    args = p.parse_args(argv)
    current = read_release(ROOT)
    if args.check:
        bad = disagreements(current)
        print("\n".join(bad) if bad else f"every install cell and badge names {current.repository} at {current.tag}")
        return 1 if bad else 0
    release = Release(args.repository or current.repository, args.tag or current.tag)
    if not re.fullmatch(r"[\w.-]+", release.tag):
        raise SystemExit(f"tag {release.tag!r}: use letters, digits, dots and dashes, e.g. v0.2.0")
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", release.repository):
        raise SystemExit(f"repository {release.repository!r}: give https://github.com/OWNER/NAME")
    config = (ROOT / "release.toml").read_text()
    config = re.sub(r'^repository = ".*"$', f'repository = "{release.repository}"', config, flags=re.M)
    config = re.sub(r'^tag = ".*"$', f'tag = "{release.tag}"', config, flags=re.M)
    (ROOT / "release.toml").write_text(config)
    # The book's "GitHub" link (myst.yml) names the repository too.
    myst = ROOT / "myst.yml"
    myst.write_text(re.sub(r"^(  github: ).*$", rf"\g<1>{release.repository}", myst.read_text(), flags=re.M))
    changed = 0
    for path in sources():
        text = path.read_text()
        if pin(text, release) != text:
            path.write_text(pin(text, release))
            changed += 1
    print(f"release.toml: {release.repository} at {release.tag}; {changed} sources rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
