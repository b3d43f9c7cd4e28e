"""The demo report's HTML: its Markdown rendered by Python-Markdown (tables, emphasis, code,
lists, escaped text, inline images), without running the demo."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("markdown")

from avkernels.app.demo.report import report_html  # noqa: E402

MARKDOWN = "\n".join(
    [
        "# Title",
        "",
        "A **bold** word, `code`, and outputs <= 0 on >= 99% of samples.",
        "",
        "| run | accuracy |",
        "|---|---|",
        "| fust_stage2 | 95.5% |",
        "",
        "- first finding",
        "- second finding",
        "",
        # the report's figure: image, then its caption after a Markdown line break
        "![Stage-1 confidences](data:image/png;base64,iVBORw0KGgo=)  ",
        "*Stage-1 confidences*",
    ]
)


def test_the_page_renders_every_element_and_escapes_text():
    page = report_html(MARKDOWN)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<h1>Title</h1>" in page
    assert "<strong>bold</strong>" in page and "<code>code</code>" in page
    assert "outputs &lt;= 0 on &gt;= 99%" in page
    assert re.search(r"<th>run</th>\s*<th>accuracy</th>", page)
    assert re.search(r"<td>fust_stage2</td>\s*<td>95.5%</td>", page)
    assert page.count("<li>") == 2
    images = re.findall(r'<img alt="([^"]*)" src="([^"]+)"', page)
    assert images == [("Stage-1 confidences", "data:image/png;base64,iVBORw0KGgo=")]
    assert "<em>Stage-1 confidences</em>" in page
