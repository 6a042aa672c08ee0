"""Every citation of the method specification resolves inside the repository.

Code, configs and docs cite `docs/method.md` as "METHOD §x[.y]" (and, after such a citation or
inside dcgen's own files, as a bare "§x.y"), its quirk rows as "Q1" … "Q17" and its decision rows
as "D1" … "D36". This test scans the repository's text files and fails when one of them

- points at the specification documents that used to live outside the repository (a `shared/docs`
  path, or the upper-case METHOD / DESIGN / STYLE `.md` file names), or
- cites a section, a quirk or a decision that `docs/method.md` does not define.

Sections defined = the headings of docs/method.md that start with "§" (`## §2 …`, `### §2.9 …`);
quirks and decisions defined = the table rows that start with `| Q3 |` / `| D21 |`.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD_DOC = ROOT / "docs" / "method.md"
THIS_FILE = Path(__file__).resolve()

TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini",
                 ".sh", ".bash", ".sbatch"}
# Without git: what .gitignore leaves out (plus anything starting with ".venv" or ending ".egg-info")
SKIP_TOP = {".git", "build", "dist", "runs", "outputs", ".pytest_cache", ".whl", ".gl"}

# --- references to the documents that lived outside the repository ------------------------------
# Case-sensitive on purpose: `docs/design.md` is the in-repository page and is fine.
OUTSIDE_DOC = re.compile(r"shared/docs|\b(?:METHOD|DESIGN|STYLE)\.md\b")

# --- section citations ---------------------------------------------------------------------------
_NUM = r"\d+(?:\.\d+)*"
_SEC = rf"§\s?{_NUM}(?:\s*[-–]\s*§?\s?{_NUM})?"           # §2.9, §3-§6, §2.11-2.12
_QD = r"[QD]\d+(?:\s*[-–]\s*[QD]?\d+)?"                    # Q3, Q1-Q4, D26-D28
# A run of section references, as in "§2.9,\n§2.11-2.12, §7.1, §11 Q3/Q4, D21". ';' ends a run:
# it separates sources ("[P2] §3.3, §3.5; [R]").
SECTION_RUN = re.compile(rf"{_SEC}(?:(?:\s*(?:,|/|&|\band\b)\s*|\s+)(?:{_QD}|{_SEC}))*")
SECTION_REF = re.compile(rf"§\s?({_NUM})(?:\s*[-–]\s*§?\s?({_NUM}))?")
# What may stand right before a run: "METHOD" makes it ours; a source tag ([P2], [H], …) or
# another document (DESIGN §3) or a figure/table/equation label makes it someone else's; nothing
# recognisable means a bare "§x", which in this repository is a METHOD section.
OWNER = re.compile(r"(\[[^\[\]\n]{1,12}\]|[A-Za-z][\w.\-]*)[\s(]*$")
FOREIGN_OWNERS = re.compile(
    r"\[[^\]]+\]|DESIGN|STYLE|Eq\.?|Eqs\.?|Table|Tables|Fig\.?|Figs\.?|Figure|App\.?|Appendix"
    r"|paper|H-Net|DiT|ADM|v1|v2", re.IGNORECASE)

# --- quirk / decision citations -----------------------------------------------------------------
# Only in citation-like surroundings: preceded by start, whitespace or ( [ / , ; : * | >, and
# followed by end, whitespace or ) ] / , ; : . * | - –. This keeps out "D_e", "2D", "3D", string
# literals such as ["D2"] (an H-Net layout code), identifiers and numbers like "D2.5".
QD_CITE = re.compile(
    r"(?<![^\s(\[/,;:*|>])([QD])(\d+)(?:\s*[-–]\s*\1?(\d+))?(?![^\s)\]/,;:.*|\-–])(?!\.\d)")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _is_text(path: Path) -> bool:
    if path.suffix in TEXT_SUFFIXES:
        return True
    if path.suffix == "":  # scripts without an extension (e.g. .ci/run)
        try:
            with path.open("rb") as f:
                return f.read(2) == b"#!"
        except OSError:
            return False
    return False


def _skipped(rel: str) -> bool:
    top = rel.split("/", 1)[0]
    return (top in SKIP_TOP or top.startswith(".venv") or top.endswith(".egg-info")
            or "/__pycache__/" in f"/{rel}")


def repository_files() -> list[Path]:
    """Tracked files plus untracked ones git does not ignore (what the next commit may hold);
    without git (an sdist, an exported tree), every file outside .git/.venv*/build/."""
    rels: list[str] | None = None
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True, timeout=120).stdout
        rels = [r for r in out.decode("utf-8", "replace").split("\0") if r]
    except (OSError, subprocess.SubprocessError):
        rels = None
    if not rels:
        rels = []
        for dirpath, dirnames, filenames in os.walk(ROOT):
            d = Path(dirpath)
            dirnames[:] = [n for n in dirnames if not _skipped(_rel(d / n))]
            rels += [_rel(d / n) for n in filenames]
    files = []
    for rel in sorted(set(rels)):
        p = ROOT / rel
        if _skipped(rel) or not p.is_file() or p.resolve() == THIS_FILE or not _is_text(p):
            continue
        files.append(p)
    return files


def _expand(lo: str, hi: str | None) -> list[str]:
    """'3','6' -> 3, 4, 5, 6; '2.11','2.12' -> 2.11, 2.12; other shapes -> both ends."""
    if hi is None:
        return [lo]
    a, b = lo.split("."), hi.split(".")
    if len(a) == len(b) and a[:-1] == b[:-1] and int(a[-1]) <= int(b[-1]):
        return [".".join(a[:-1] + [str(k)]) for k in range(int(a[-1]), int(b[-1]) + 1)]
    return [lo, hi]


def section_citations(text: str) -> list[tuple[int, str]]:
    """(offset, section) for every METHOD section cited in `text`."""
    found = []
    for run in SECTION_RUN.finditer(text):
        before = text[max(0, run.start() - 40):run.start()]
        m = OWNER.search(before)
        owner = m.group(1) if m else ""
        if owner and FOREIGN_OWNERS.fullmatch(owner):
            continue
        for ref in SECTION_REF.finditer(run.group(0)):
            for sec in _expand(ref.group(1), ref.group(2)):
                found.append((run.start() + ref.start(), sec))
    return found


def qd_citations(text: str) -> list[tuple[int, str]]:
    """(offset, 'Q3' / 'D21') for every quirk or decision cited in `text`."""
    found = []
    for m in QD_CITE.finditer(text):
        kind, lo, hi = m.group(1), int(m.group(2)), m.group(3)
        for k in range(lo, (int(hi) if hi else lo) + 1):
            found.append((m.start(), f"{kind}{k}"))
    return found


def defined_in_method() -> tuple[set[str], set[str]]:
    text = METHOD_DOC.read_text(encoding="utf-8")
    sections = set(re.findall(r"^#{1,6}\s+§(\d+(?:\.\d+)*)\b", text, re.MULTILINE))
    rows = set(re.findall(r"^\|\s*([QD]\d+)\s*\|", text, re.MULTILINE))
    return sections, rows


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


# ------------------------------------------------------------------------------------------------


def test_parser_on_examples():
    text = "(METHOD §2.9,\n§2.11-2.12, §7.1, §11 Q3/Q4, D21), whole-bf16 models"
    assert [s for _, s in section_citations(text)] == ["2.9", "2.11", "2.12", "7.1", "11"]
    assert [c for _, c in qd_citations(text)] == ["Q3", "Q4", "D21"]
    assert [s for _, s in section_citations("(METHOD §3-§6)")] == ["3", "4", "5", "6"]
    assert [s for _, s in section_citations("METHOD §5.2 b: along")] == ["5.2"]
    assert [s for _, s in section_citations("the FID protocol, §8).")] == ["8"]
    for foreign in ("([P2] §3.3, §3.5; [R])", "[H] §2.2", "(DESIGN §3/§4)", "[P2] §3.2 Eq. 1"):
        assert section_citations(foreign) == [], foreign
    assert [c for _, c in qd_citations("(METHOD §11, Q1-Q4, Q6, Q8) and D18-D20")] == [
        "Q1", "Q2", "Q3", "Q4", "Q6", "Q8", "D18", "D19", "D20"]
    assert [c for _, c in qd_citations("| Q3 | x |; **D21**; [R] Q3; Q15/D29.")] == [
        "Q3", "D21", "Q3", "Q15", "D29"]
    not_citations = ('arch_layout = ["c2", ["D2"], "c2"]', "2D and 3D grids, D_e, D = 768",
                     "DiT-B/2, x.D2, D2.5, fooQ3, Q3_x, 'D4', `D5`, D6(x)")
    for t in not_citations:
        assert qd_citations(t) == [], t


def test_method_doc_numbering():
    """docs/method.md keeps its numbering contiguous, so citations stay stable."""
    assert METHOD_DOC.is_file(), "docs/method.md is missing"
    sections, rows = defined_in_method()
    tops = sorted(int(s) for s in sections if "." not in s)
    assert tops == list(range(1, len(tops) + 1)), f"top-level sections: {tops}"
    for top in tops:
        subs = sorted(int(s.split(".")[1]) for s in sections if s.startswith(f"{top}."))
        assert subs == list(range(1, len(subs) + 1)), f"§{top} subsections: {subs}"
    for kind in "QD":
        nums = sorted(int(r[1:]) for r in rows if r[0] == kind)
        assert nums and nums == list(range(1, len(nums) + 1)), f"{kind} rows: {nums}"


def test_no_reference_to_outside_docs():
    bad = []
    for path in repository_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in OUTSIDE_DOC.finditer(text):
            bad.append(f"{_rel(path)}:{_line(text, m.start())}: {m.group(0)!r}")
    assert not bad, ("these files point at specification documents outside the repository; "
                     "cite docs/method.md or docs/design.md instead:\n  " + "\n  ".join(bad))


def test_every_citation_resolves():
    sections, rows = defined_in_method()
    bad, seen_sec, seen_qd = [], 0, 0
    for path in repository_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for off, sec in section_citations(text):
            seen_sec += path != METHOD_DOC
            if sec not in sections:
                bad.append(f"{_rel(path)}:{_line(text, off)}: METHOD §{sec}")
        for off, ref in qd_citations(text):
            seen_qd += path != METHOD_DOC
            if ref not in rows:
                bad.append(f"{_rel(path)}:{_line(text, off)}: {ref}")
    assert not bad, ("these citations are not defined in docs/method.md (a '§' heading or a "
                     "'| Qn |' / '| Dn |' table row):\n  " + "\n  ".join(bad))
    # the scan really ran over the repository (and did not, say, find no files at all)
    assert seen_sec > 0 and seen_qd > 0, (seen_sec, seen_qd)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
