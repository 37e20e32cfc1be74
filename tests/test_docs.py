"""docs/ and README.md: no template left unrendered, and every generated page or section is what its generator
writes now (`python -m model.cli docs`)."""
import re

import pytest

from model.cli import GENERATED, ROOT, generated, markers
from model.config import GPTConfig, TrainConfig

PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
# what str.format or a template engine leaves behind: a {name} field, or a {{ escape (never valid JSON, while
# a nested JSON object may well close with }})
PLACEHOLDER = re.compile(r"\{\{|(?<!\{)\{[A-Za-z_][A-Za-z0-9_.]*\}(?!\})")


def test_the_placeholder_pattern_catches_templates_and_passes_json():
    assert PLACEHOLDER.search("the papers:\n{papers}## The planner")
    assert PLACEHOLDER.search('prints `{{"paper", "rows": [{{"name"}}]}}`')
    assert not PLACEHOLDER.search('prints `{"paper", "rows": [{"name", "ours"}], "by": {"exact": {...}}}` to <run>/')


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_page_holds_an_unrendered_placeholder(page):
    text = page.read_text(encoding="utf-8")
    found = [(text.count("\n", 0, m.start()) + 1, m.group()) for m in PLACEHOLDER.finditer(text)]
    assert not found, f"{page.name}: unrendered placeholders (line, text): {found}"


@pytest.mark.parametrize("page", sorted(GENERATED))
def test_generated_pages_are_what_their_generator_writes(page):
    current = (ROOT / page).read_text(encoding="utf-8")
    assert generated(page, current) == current, f"{page} is stale: run `python -m model.cli docs`"


def test_a_stale_or_unmarked_section_is_caught(tmp_path):
    begin, end = markers("papers")
    page = f"# FLOPs\n\n{begin}old table\n{end}\n## The planner\n"
    new = generated("docs/flops.md", page)
    assert new != page and new.startswith(f"# FLOPs\n\n{begin}### gpt3") and new.endswith(f"{end}\n## The planner\n")
    assert generated("docs/flops.md", new) == new
    with pytest.raises(ValueError, match="papers"):
        generated("docs/flops.md", "# FLOPs\n{papers}\n")


def test_config_md_lists_every_key_with_its_help():
    doc = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    for cls in (GPTConfig, TrainConfig):
        for name, f in cls.__dataclass_fields__.items():
            assert f"| `{name}` |" in doc and f.metadata["help"] in doc


# A measured figure (a time, a rate, an MFU) lives in docs/benchmarks.md with its command, date and machine;
# other pages point there. Any such figure another page states must be one benchmarks.md states.
MEASURED = re.compile(r"\d[\d,.]* ?ms/step|\d[\d,.]* ?s/step|\d[\d.]* ?min wall|\d[\d.]* ?s wall|\d[\d,]* tok/s"
                      r"|MFU \d[\d.]*%|mfu \d[\d.]*%|\d[\d.]*% MFU")
POINTING = ["README.md", "docs/flops.md", "docs/training.md"]


def test_the_measured_figure_pattern():
    line = "median 80.0 ms/step, 4.2 min wall, 3,025 tok/s mfu 36.3% and MFU 43.0%; estimated at 40% MFU"
    assert MEASURED.findall(line) == ["80.0 ms/step", "4.2 min wall", "3,025 tok/s", "mfu 36.3%", "MFU 43.0%",
                                      "40% MFU"]


@pytest.mark.parametrize("page", POINTING)
def test_measured_figures_elsewhere_are_the_ones_in_benchmarks_md(page):
    record = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    stated = set(MEASURED.findall((ROOT / page).read_text(encoding="utf-8")))
    stated -= {"40% MFU", "MFU 40%"}  # the planner's assumed MFU, not a measurement
    assert not {f for f in stated if f not in record}, f"{page} states figures docs/benchmarks.md does not"
