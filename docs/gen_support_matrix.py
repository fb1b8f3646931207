"""Write docs/support.md, the architecture support matrix, from tests/test_architecture_matrix.py.

For each Python environment given, runs the test module there under pytest with ``--junitxml``
and reads back the outcome of every ``test_<check>[<case>]``; then writes one row per
architecture (case) with the checks that passed on the nnsight backend on each transformers
version measured, and a TransformerBridge column summing up the module's bridge checks
(``BRIDGE_CHECKS``) on the environments that have TransformerLens >= 3, with the reasons of its
known failures (``BRIDGE_LIMITS``, strict xfails).

Run from the repository root (no network, CPU only, a few minutes per environment):

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

Outcome = str  # "passed" | "failed" | "skipped" | "xfailed" | "not run"


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
        outcomes[check, key] = _outcome(case)
    return outcomes


def _outcome(case: ET.Element) -> Outcome:
    """A junit test case's outcome; a strict xfail that passed is reported as a failure."""
    if {child.tag for child in case} & {"failure", "error"}:
        return "failed"
    skipped = case.find("skipped")
    if skipped is None:
        return "passed"
    return "xfailed" if skipped.get("type") == "pytest.xfail" else "skipped"


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


_MARK = {"passed": "✓", "failed": "✗", "xfailed": "✗", "skipped": "skipped", "not run": "not run"}


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


def _has_bridge(env: Environment) -> bool:
    """Whether the environment has TransformerBridge (TransformerLens >= 3)."""
    major = env.versions.get("transformer-lens", "0").split(".")[0]
    return major.isdigit() and int(major) >= 3


def _bridge_cell(matrix: Any, key: str, envs: list[Environment], notes: dict[str, str]) -> str:
    """The TransformerBridge column of one case over the environments that have the bridge: ✓
    when every bridge check passed, "unsupported (bn)" when the bridge cannot boot the case,
    else the mark of each check, with the note of its known failure."""
    if not envs:
        return "not measured (needs TransformerLens ≥ 3)"
    limit = matrix.BRIDGE_LIMITS.get(key)
    note = "" if limit is None else f" ({notes[limit.reason]})"
    outcomes = {
        check: [
            (env.versions.get("transformers", "?"), env.outcomes.get((check, key), "not run"))
            for env in envs
        ]
        for check in matrix.BRIDGE_CHECKS
    }
    all_xfailed = all(o == "xfailed" for results in outcomes.values() for _, o in results)
    if limit is not None and not limit.boots and all_xfailed:
        return f"unsupported{note}"
    marks = {check: _cell(results, None) for check, results in outcomes.items()}
    if len(set(marks.values())) == 1:  # the same on every check
        mark = next(iter(marks.values()))
        return mark + (note if "✗" in mark else "")
    cell = " · ".join(f"{check.removeprefix('bridge_')} {mark}" for check, mark in marks.items())
    return cell + (note if "✗" in cell else "")


def render(envs: list[Environment], command: str) -> str:
    matrix = _matrix_module()
    checks: dict[str, str] = matrix.CHECKS
    reasons = _refusals(matrix)
    notes = {reason: i + 1 for i, reason in enumerate(dict.fromkeys(reasons.values()))}
    versions = [env.versions.get("transformers", "?") for env in envs]
    bridge_checks: dict[str, str] = matrix.BRIDGE_CHECKS
    bridge_envs = [env for env in envs if _has_bridge(env)]
    limits = matrix.BRIDGE_LIMITS.values() if bridge_envs else []
    bridge_notes = {
        reason: f"b{i + 1}" for i, reason in enumerate(dict.fromkeys(lim.reason for lim in limits))
    }
    bridge_stacks = "; ".join(
        f"transformers {env.versions.get('transformers', '?')}, TransformerLens "
        f"{env.versions['transformer-lens']}"
        for env in bridge_envs
    )
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
        *(f"| {name} | {what} |" for name, what in bridge_checks.items()),
        "",
        "The check columns are the nnsight backend's. ✓ passed, ✗ failed; where versions differ,",
        "the mark is given per transformers version.",
        '"refused (n)": the folded value-bias convention is undefined for the model and is '
        "refused with the reason numbered below (the check passes when it is).",
        "",
        "The TransformerBridge column sums up the bridge checks, which run z, patterns and "
        "splice through `TransformerBridge.boot_transformers(name, hf_model=..., tokenizer=...)` "
        "over a copy of the same model (TransformerLens ≥ 3 only, so measured on "
        + (bridge_stacks or "no environment given")
        + '): ✓ all three passed; otherwise the mark of each; "unsupported": the bridge does not '
        'boot the model; "(bn)": a known failure, the reason given below.',
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
        "| architecture | class | transformers | " + " | ".join(checks) + " | TransformerBridge |",
        "|" + "---|" * (3 + len(checks) + 1),
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
        row.append(_bridge_cell(matrix, key, bridge_envs, bridge_notes))
        label = f"{case.label} | `{case.hf_class}` | {', '.join(versions)}"
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines += ["", "Why the folded convention is refused:", ""]
    lines += [f"{n}. {reason[0].upper()}{reason[1:]}." for reason, n in notes.items()]
    if bridge_notes:
        lines += ["", "Where the TransformerBridge checks are known to fail:", ""]
        lines += [f"- ({n}) {reason}." for reason, n in bridge_notes.items()]
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
