"""docs/flags.md is generated from the parser: the committed file must be what tools/flags_doc.py writes now."""

import os

from tools.flags_doc import render

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_flags_doc_is_current():
    with open(os.path.join(ROOT, "docs", "flags.md")) as f:
        committed = f.read()
    assert committed == render(), "docs/flags.md is stale: run `python tools/flags_doc.py > docs/flags.md`"


def test_flags_doc_covers_every_flag():
    from megatron.arguments import build_parser

    text = render()
    missing = [a.option_strings[0] for a in build_parser()._actions
               if a.option_strings and a.dest != "help" and f"`{a.option_strings[0]}`" not in text]
    assert not missing
    for section in ("## DeepSpeed JSON", "## Not supported, and why", "Tensor and pipeline parallelism",
                    "Mixture of Experts"):
        assert section in text
