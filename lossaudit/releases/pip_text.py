"""What pip (or uv) writes that lossaudit reads: distribution names (PEP 503), the constraints a
conflict names, and the one line that says why an installer failed."""

from __future__ import annotations

import re

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

# an installer's explanation of a conflict: pip's "The user requested (constraint) tokenizers==0.23.3",
# uv's "... and you require tokenizers==0.23.3, we can conclude ..."
_CONSTRAINT_IN_CONFLICT = re.compile(r"(?:The user requested \(constraint\)|you require) ([A-Za-z0-9._-]+)==")


def normalize(name: str) -> str:
    """PEP 503: ``Typing_Extensions`` and ``typing-extensions`` are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def conflicting_constraints(output: str, pinned: set[str]) -> set[str]:
    """The base constraints an installer names in a conflict (never a pin: those must hold):
    a constrained distribution itself, or (pip) a constrained distribution whose own
    requirement on the contested one admits no version that a pin's requirement admits
    (kernels needs huggingface-hub>=1.32 where transformers 4.46 needs <1.0)."""
    named = {normalize(n) for n in _CONSTRAINT_IN_CONFLICT.findall(output)} - pinned
    return named or _incompatible_dependers(output, pinned)


def _incompatible_dependers(output: str, pinned: set[str]) -> set[str]:
    needs = [(normalize(who), normalize(what), _specifiers(spec)) for who, what, spec in _DEPENDS.findall(output)]
    lifted = set()
    for contested in {what for _, what, _ in needs}:
        pins = [spec for who, what, spec in needs if what == contested and who in pinned]
        if not pins:
            continue
        mentioned = {Version(s.version) for _, what, spec in needs if what == contested for s in spec
                     if _is_version(s.version)}
        allowed = [v for v in mentioned if all(v in spec for spec in pins)]
        for who, what, spec in needs:
            if what == contested and who not in pinned and not any(v in spec for v in allowed):
                lifted.add(who)
    return lifted


# pip: "    kernels 0.19.1 depends on huggingface-hub>=1.32.0", "transformers 4.46.0 depends on x<1.0 and >=0.23.2"
_DEPENDS = re.compile(r"^\s*(\S+) \S+ depends on ([A-Za-z0-9._-]+)(?:\[[^\]]*\])?([^;\n]*)", re.MULTILINE)


def _specifiers(text: str) -> SpecifierSet:
    try:
        return SpecifierSet(",".join(part.strip() for part in text.split(" and ") if part.strip()))
    except InvalidSpecifier:
        return SpecifierSet()


def _is_version(text: str) -> bool:
    try:
        Version(text)
        return True
    except InvalidVersion:
        return False


def reason_line(output: str) -> str:
    """Why an installer failed, as one line: pip's own explanation of a conflict ("The conflict
    is caused by: ...") where it gives one, else its error line."""
    lines = [" ".join(line.split()) for line in output.splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if line.startswith("The conflict is caused by")), None)
    if start is not None:
        cause = []
        for line in lines[start + 1:]:
            if line.startswith(("To fix this", "ERROR:", "Additionally, some packages")):
                break
            cause.append(line)
        return f"the conflict is caused by: {'; '.join(cause)}"[:600]
    for marker in ("No matching distribution found", "conflicting dependencies", "Could not find a version",
                   "No solution found", "ERROR:", "error:"):
        hit = next((line for line in lines if marker in line), None)
        if hit:
            return hit.removeprefix("ERROR: ").removeprefix("error: ")[:300]
    return (lines[-1] if lines else "the installer failed with no output")[:300]
