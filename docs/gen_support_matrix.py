"""Write docs/support.md, the architecture support matrix, from tests/test_architecture_matrix.py.

For each Python environment given, runs the test module there under pytest with ``--junitxml``
and reads back the outcome of every ``test_<check>[<case>]``; then writes one row per
architecture (case) with the checks that passed on the nnsight backend on each transformers
version measured, and a column for the TransformerBridge backend, "not yet measured" until
the matrix runs on it too.

Run from the repository root (no network, CPU only, about a minute per environment):

    python docs/gen_support_matrix.py                       # this interpreter's environment
    python docs/gen_support_matrix.py --python ENV1/bin/python --python ENV2/bin/python
    python docs/gen_support_matrix.py --check               # fail if docs/support.md is stale
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
TEST_MODULE = "tests/test_architecture_matrix.py"
OUT = ROOT / "docs" / "support.md"
PACKAGES = ("transformers", "torch", "nnsight", "sae-lens", "transformer-lens")
BACKENDS = ("nnsight", "TransformerBridge")
MEASURED = {"nnsight"}
"""Backends the test module checks (one column per check); the others get a column saying
"not yet measured"."""

Outcome = str  # "passed" | "failed" | "skipped" | "not run"


class Environment(NamedTuple):
    python: str
    versions: dict[str, str]
    """Installed version of each of ``PACKAGES`` (absent ones left out)."""
    outcomes: dict[tuple[str, str], Outcome]
    """``(check, case) -> outcome``."""


def _versions(python: str) -> dict[str, str]:
    code = (
        "import json\nfrom importlib.metadata import version, PackageNotFoundError\n"
        "out = {}\n"
        f"for name in {PACKAGES!r}:\n"
        "    try:\n        out[name] = version(name)\n"
        "    except PackageNotFoundError:\n        pass\n"
        "print(json.dumps(out))"
    )
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def _outcomes(python: str) -> dict[tuple[str, str], Outcome]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        command = [python, "-m", "pytest", TEST_MODULE, "-q", "-p", "no:cacheprovider"]
        subprocess.run([*command, f"--junitxml={report}"], cwd=ROOT, check=False)
        if not report.exists():
            raise SystemExit(f"pytest under {python} wrote no report: see its output above")
        tree = ET.parse(report)
    outcomes: dict[tuple[str, str], Outcome] = {}
    for case in tree.iter("testcase"):
        name = case.get("name", "")
        if not name.startswith("test_") or "[" not in name:
            continue
        check, key = name[len("test_") :].rstrip("]").split("[", 1)
        tags = {child.tag for child in case}
        failed = tags & {"failure", "error"}
        outcomes[check, key] = "failed" if failed else "skipped" if "skipped" in tags else "passed"
    return outcomes


def measure(python: str) -> Environment:
    """Run the matrix under ``python`` and collect what passed."""
    return Environment(python, _versions(python), _outcomes(python))


def _matrix_module() -> Any:
    sys.path.insert(0, str(ROOT))
    import tests.test_architecture_matrix as matrix

    return matrix


def _refusals(matrix: Any) -> dict[str, str]:
    """Why the folded convention is refused, per case that refuses it, in the library's words."""
    from sae_lens_attn.backends.architectures import hf_architecture

    reasons: dict[str, str] = {}
    for key, case in matrix.CASES.items():
        if case.refusal is not None:
            reason = hf_architecture(case.hf_class).folded_refusal(case.config())
            reasons[key] = reason or "refused"
    return reasons


_MARK = {"passed": "✓", "failed": "✗", "skipped": "skipped", "not run": "not run"}


def _cell(results: list[tuple[str, Outcome]], refusal_note: str | None) -> str:
    """One check of one case: the same mark on every version, else the mark per version."""
    marks = {outcome for _, outcome in results}
    if refusal_note is not None:  # the check passes when the refusal is raised
        results = [(v, "refused" if o == "passed" else o) for v, o in results]
        marks = {outcome for _, outcome in results}
        if marks == {"refused"}:
            return f"refused {refusal_note}"
    if len(marks) == 1:
        return _MARK.get(results[0][1], results[0][1])
    return " · ".join(f"{_MARK.get(outcome, outcome)} {version}" for version, outcome in results)


def render(envs: list[Environment], command: str) -> str:
    matrix = _matrix_module()
    checks: dict[str, str] = matrix.CHECKS
    reasons = _refusals(matrix)
    notes = {reason: i + 1 for i, reason in enumerate(dict.fromkeys(reasons.values()))}
    versions = [env.versions.get("transformers", "?") for env in envs]
    lines = [
        "# Architecture support",
        "",
        "<!-- Generated by docs/gen_support_matrix.py from tests/test_architecture_matrix.py; "
        "do not edit by hand. -->",
        "",
        "Which Hugging Face causal-LM classes the backends support, and what of them is checked.",
        "Each row is one tiny model (two layers, small dimensions, eager attention, seeded random",
        "weights, non-zero biases wherever the class has them) built offline from its",
        "transformers config, and each check compares the backend with a computation that does",
        "not go through it:",
        "",
        "| check | passes when |",
        "|---|---|",
        *(f"| {name} | {what} |" for name, what in checks.items()),
        "",
        "The check columns are the nnsight backend's. ✓ passed, ✗ failed; where versions differ,",
        "the mark is given per transformers version.",
        '"refused (n)": the folded value-bias convention is undefined for the model and is '
        "refused with the reason numbered below (the check passes when it is).",
        "",
        "Regenerate this page (it is committed as generated) with",
        "",
        "```",
        command,
        "```",
        "",
        "Measured on:",
        "",
        *(
            "- " + ", ".join(f"{name} {version}" for name, version in env.versions.items())
            for env in envs
        ),
        "",
        "| architecture | class | transformers | "
        + " | ".join(checks)
        + " | "
        + " | ".join(b for b in BACKENDS if b not in MEASURED)
        + " |",
        "|" + "---|" * (3 + len(checks) + len(BACKENDS) - len(MEASURED)),
    ]
    for key, case in matrix.CASES.items():
        row = []
        for check in checks:
            results = [
                (version, env.outcomes.get((check, key), "not run"))
                for version, env in zip(versions, envs, strict=True)
            ]
            note = f"({notes[reasons[key]]})" if check == "folded" and key in reasons else None
            row.append(_cell(results, note))
        row += ["not yet measured" for b in BACKENDS if b not in MEASURED]
        label = f"{case.label} | `{case.hf_class}` | {', '.join(versions)}"
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines += ["", "Why the folded convention is refused:", ""]
    lines += [f"{n}. {reason[0].upper()}{reason[1:]}." for reason, n in notes.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--python",
        action="append",
        help="interpreter of an environment to measure (repeatable; default: this one)",
    )
    parser.add_argument("--out", type=Path, default=OUT, help=f"page to write (default: {OUT})")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; fail if the page would change"
    )
    args = parser.parse_args(argv)
    pythons = args.python or [sys.executable]
    flags = " ".join(f"--python {python}" for python in args.python or [])
    command = f"python docs/gen_support_matrix.py {flags}".rstrip()
    text = render([measure(python) for python in pythons], command)
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale; regenerate it with: {command}", file=sys.stderr)
            return 1
        return 0
    staged = args.out.with_name(f".{args.out.name}.tmp")
    staged.write_text(text)
    staged.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
