"""docs/reliability.md is produced by the suite; every reliability case collected here must be in it."""

from __future__ import annotations

from pathlib import Path

import pytest
from _reliability import CATEGORIES, collected_cases, render

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"


def test_every_collected_case_is_in_the_document(request):
    cases = collected_cases(request.session)
    if not cases:
        pytest.skip("no reliability case collected in this session (run the whole suite)")
    text = DOC.read_text()
    missing = [nodeid for _, _, nodeid in cases if "`" + nodeid.removeprefix("tests/") + "`" not in text]
    assert not missing, f"{len(missing)} reliability case(s) not in {DOC.name}; run `make reliability`: {missing[:5]}"


def test_document_reports_no_failure():
    text = DOC.read_text()
    assert "| FAIL" not in text, "docs/reliability.md records a failed case"
    assert "not passed" not in text


def test_render_marks_failures_and_groups_by_category():
    recs = [
        dict(
            category="config",
            case="a|b",
            status="pass",
            slow=False,
            test="tests/t.py::x",
            observed="err",
            kept="nothing",
        ),
        dict(
            category="fault",
            case="worker killed",
            status="FAIL",
            slow=True,
            test="tests/t.py::y",
            observed="o",
            kept="k",
        ),
    ]
    md = render(recs)
    assert "2 cases, 1 passed, **1 not passed**" in md
    assert md.index("## config") < md.index("## fault")
    assert "a\\|b" in md and "FAIL (slow)" in md
    assert set(CATEGORIES) >= {"config", "fault"}
