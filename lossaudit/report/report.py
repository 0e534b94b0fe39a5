"""The report: every case of one run as one pandas DataFrame, plus its environment.

The JSON layout (``lossaudit.report/1``) is a public contract, documented in docs/report.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..core.errors import DivergenceError, UsageError
from .environment import STACKS
from .objective_line import objective_line, says_it_whole

SCHEMA = "lossaudit.report/1"
CASE_COLUMNS = [
    "path", "reduction", "microbatches", "padding", "grouping", "world_size", "tokens",
    "loss", "reference_loss", "loss_abs_err", "loss_rel_err", "grad_rel_err", "grad_cosine",
    "grad_max_abs", "grad_scale", "worst_param", "worst_param_rel_err", "verdict", "expected", "detail",
]
SUMMARY_COLUMNS = ["path", "reduction", "microbatches", "padding", "grouping", "loss_rel_err", "grad_rel_err", "verdict"]


@dataclass
class Report:
    environment: dict
    model: dict
    cases: pd.DataFrame
    tolerance: dict = field(default_factory=dict)
    batch: dict = field(default_factory=dict)
    # per-tensor gradient errors of the worst case(s) only: [{case fields..., "tensors": [[name, err]]}]
    tensor_errors: list = field(default_factory=list)

    @property
    def findings(self) -> pd.DataFrame:
        """Cases that fail the run: not matching, and not a known-different harness reduction."""
        bad = (self.cases["verdict"] != "match") & ~self.cases["expected"].astype(bool)
        return self.cases[bad]

    @property
    def exit_status(self) -> int:
        return 1 if len(self.findings) else 0

    def worst_first(self, frame: pd.DataFrame | None = None) -> pd.DataFrame:
        frame = self.cases if frame is None else frame
        order = frame["verdict"].map({"error": 0, "diverge": 1, "match": 2})
        keyed = frame.assign(_o=order, _g=frame["grad_rel_err"].fillna(math.inf))
        return keyed.sort_values(["_o", "_g"], ascending=[True, False]).drop(columns=["_o", "_g"])

    def assert_clean(self) -> "Report":
        __tracebackhide__ = True  # pytest shows the caller's line and this message, not our frame
        if len(self.findings):
            raise DivergenceError(findings_table(self))
        return self

    def to_dict(self) -> dict:
        cases = [
            {k: _json_value(v) for k, v in row.items()}
            for row in self.cases.to_dict(orient="records")
        ]
        return {
            "schema": SCHEMA,
            "environment": self.environment,
            "model": self.model,
            "tolerance": self.tolerance,
            "batch": self.batch,
            "tensor_errors": _json_value(self.tensor_errors),
            "cases": cases,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("cases"), list):
            raise UsageError(f"not a lossaudit report (expected schema {SCHEMA!r})")
        problem = report_problem(data)
        if problem:
            raise UsageError(f"not a valid lossaudit report: {problem}")
        cases = pd.DataFrame(data["cases"])
        for column in CASE_COLUMNS:
            if column not in cases:
                cases[column] = None
        return cls(data.get("environment", {}), data.get("model", {}), cases,
                   data.get("tolerance", {}), data.get("batch", {}), data.get("tensor_errors", []))

    @classmethod
    def load(cls, path: str | Path) -> "Report":
        try:
            data = parse_json(read_bounded(Path(path)))
        except FileNotFoundError:
            raise UsageError(f"{path}: no such report") from None
        except PermissionError:
            raise UsageError(f"{path}: permission denied") from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: cannot read report: {exc}") from None
        try:
            return cls.from_dict(data)
        except UsageError as exc:
            raise UsageError(f"{path}: {exc}") from None


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.3g}"
    return "" if value is None else str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    columns = list(frame.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in frame.itertuples(index=False):
        cells = (_fmt(v).replace("|", "\\|").replace("\n", " ") for v in row)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def findings_table(report: "Report") -> str:
    findings = report.worst_first(report.findings)
    columns = SUMMARY_COLUMNS + ["detail"]
    return f"{len(findings)} finding(s):\n" + markdown_table(findings[columns])


def summary_frame(report: Report) -> pd.DataFrame:
    """Worst error per (path, reduction) and k: the pivot a person reads first."""
    cases = report.cases.assign(label=report.cases["path"] + report.cases["reduction"].map(
        lambda r: f":{r}" if isinstance(r, str) else ""))
    table = cases.pivot_table(index="label", columns="microbatches", values="grad_rel_err",
                              aggfunc="max", dropna=False, sort=False)
    table = table.reindex(columns=sorted(table.columns))  # k ascending, whichever path ran first
    table.columns = [f"k={k}" for k in table.columns]
    return table


def describe(report: Report) -> tuple[str, str, str]:
    """Title, environment sentence and reference sentence, shared by Markdown and HTML."""
    env = report.environment
    model = report.model
    tol = report.tolerance
    return (
        f"lossaudit report: {model.get('name')} ({model.get('task')})",
        f"torch {env.get('torch')}, transformers {env.get('transformers')}, python {env.get('python')}, "
        f"{env.get('device')} {env.get('dtype')}, seed {env.get('seed')}; {model.get('parameters')} parameters.",
        (f"Reference: each optimizer step, {objective_line(model)} in float64, over "
         f"{report.batch.get('target_tokens')} completion tokens, judged on the gradient (the loss is not "
         f"compared). " if says_it_whole(model) else
         f"Reference: full batch, {_aggregation(model)} in float64, "
         f"loss {report.batch.get('reference_loss', float('nan')):.6g} "
         f"over {report.batch.get('target_tokens')} target tokens. ") +
        f"Tolerance {tol.get('rtol', float('nan')):.3g} "
        f"relative (measured noise floor {tol.get('noise_floor', float('nan')):.3g}, dtype floor {tol.get('floor')}).",
    )


def _aggregation(model: dict) -> str:
    """The declared aggregation in the reference sentence (a report without one: the token mean)."""
    if model.get("aggregation", "token-mean") == "token-mean" and not says_it_whole(model):
        return "token mean"
    return objective_line(model)



MAX_REPORT_BYTES = 256 << 20  # a report of a thousand cases is about 1 MiB


def read_bounded(path: Path, limit: int = MAX_REPORT_BYTES) -> str:
    """The file's text, refusing one larger than ``limit`` (or endless, as /dev/zero) unread."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit >> 20} MiB, which no report is")
    return data.decode("utf-8")


def parse_json(text: str):
    """``json.loads``, with JSON nested too deeply for the parser (100000 brackets) a ValueError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("its JSON is nested too deeply") from None


NUMBER_FIELDS = ("loss", "reference_loss", "loss_abs_err", "loss_rel_err", "grad_rel_err", "grad_cosine",
                 "grad_max_abs", "grad_scale", "worst_param_rel_err")
TEXT_FIELDS = {"path": False, "padding": False, "grouping": False, "reduction": True, "worst_param": True,
               "detail": True}  # field: may be null
VERDICTS = ("match", "diverge", "error")
SECTIONS = {"environment": dict, "model": dict, "tolerance": dict, "batch": dict, "tensor_errors": list}


# the fields of each section that compare, a baseline or a renderer reads: field -> kind
SECTION_FIELDS = {
    "environment": {"python": "text", "torch": "text", "transformers": "text", "accelerate": "text", "trl": "text",
                    **{package: "text" for package in STACKS},
                    "device": "text", "dtype": "text", "seed": "count"},
    "model": {"name": "text", "task": "text", "parameters": "count"},
    "tolerance": {"rtol": "number", "floor": "number", "noise_floor": "number", "cap": "number", "dtype": "text"},
    "batch": {"sequences": "count", "target_tokens": "count", "lengths": "counts", "targets": "counts",
              "reference_loss": "number", "objective": "text"},
}


def report_problem(data: dict) -> str | None:
    """The first field of a report.json that compare or a baseline could not use, else None.
    A section may be missing (an older report); present, it must be what lossaudit writes."""
    for key, kind in SECTIONS.items():
        if key in data and not isinstance(data[key], kind):
            return f"{key!r} is {_shown(data[key])}, not a{'n object' if kind is dict else ' list'}"
    for section, fields in SECTION_FIELDS.items():
        for key, kind in fields.items():
            value = data.get(section, {}).get(key)
            if value is not None and not _is(value, kind):
                return f"'{section}.{key}' is {_shown(value)}, not {KIND_NAMES[kind]}"
    for i, case in enumerate(data["cases"]):
        problem = _case_problem(case)
        if problem:
            return f"case {i + 1}: {problem}"
    return None


def _case_problem(case) -> str | None:
    if not isinstance(case, dict):
        return f"a {type(case).__name__}, not an object"
    for key, nullable in TEXT_FIELDS.items():
        value = case.get(key)
        if not (isinstance(value, str) or (value is None and (nullable or key not in case))):
            return f"{key!r} is {value!r}, not a string"
    for key in ("microbatches", "world_size"):
        value = case.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            return f"{key!r} is {value!r}, not a positive integer"
    if not isinstance(case.get("microbatches"), int):
        return "'microbatches' is missing"
    if case.get("verdict") not in VERDICTS:
        return f"'verdict' is {case.get('verdict')!r}, not one of {', '.join(VERDICTS)}"
    if not isinstance(case.get("expected", False), bool):
        return f"'expected' is {case.get('expected')!r}, not true or false"
    for key in NUMBER_FIELDS:
        value = case.get(key)
        if value is not None and not _is(value, "number"):
            return f"{key!r} is {_shown(value)}, not a number"
    if case.get("tokens") is not None and not _is(case["tokens"], "counts"):
        return f"'tokens' is {_shown(case['tokens'])}, not a list of token counts"
    return None


KIND_NAMES = {"text": "a string", "count": "a whole number", "counts": "a list of whole numbers",
              "number": "a number"}


def _is(value, kind: str) -> bool:
    """Whether ``value`` (not None) is of ``kind``; true and false are no numbers."""
    if kind == "text":
        return isinstance(value, str)
    if kind == "counts":
        return isinstance(value, list) and all(_is(v, "count") for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return kind == "number" or (isinstance(value, int) and value >= 0)


def _shown(value) -> str:
    """A bad value as one short phrase of the error line."""
    if value is None:
        return "null"
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__} ({text[:30]}...)"


def _json_value(value):
    """NaN and Inf are not JSON: they become null (the verdict and detail say why)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # numpy scalars
        return _json_value(value.item())
    if hasattr(value, "tolist"):  # numpy arrays (a list column read back from pandas)
        return _json_value(value.tolist())
    return value
