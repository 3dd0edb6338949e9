"""No evaluation instance of a bundled task appears in the training corpus."""

import numpy as np
import pytest

from passuntil.models.corpus import token_stream
from passuntil.models.train import SeriesConfig, plan
from passuntil.tasks import bundled as B
from passuntil.tasks import get_task


def _corpus_text() -> str:
    cfg = SeriesConfig()
    need = max(plan(cfg, i)["tokens"] for i in cfg.indices) + cfg.seq_len + 1  # what the largest model saw
    ids = token_stream(need, seed=cfg.seed)
    return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


@pytest.mark.slow
def test_no_evaluation_item_in_the_training_corpus():
    text = _corpus_text()
    items = B.heldout()
    forbidden = []
    for a, b in items["arith"]:
        forbidden += [f"\n{a}+{b}=", f"\n{b}+{a}="]
    for d in items["dates"]:
        forbidden += [fmt(d) for fmt in B.DATE_FORMATS.values()]
    for s in items["reverse"]:
        forbidden += [f"reverse: {s} ->", f"reverse: {s[::-1]} ->"]
    for inst in get_task("code").instances:
        forbidden.append(inst.prompt.split("(")[0] + "(")  # "def add_seven("
    found = [f for f in forbidden if f in text]
    assert not found, f"{len(found)} evaluation items leak into the corpus, e.g. {found[:3]}"
    # and the corpus does contain the formats (the check above would be vacuous otherwise)
    assert text.count("reverse: ") > 1000 and text.count(" -> ") > 10_000 and "def add_" in text
    prompts = [get_task(t).prompt(x) for t in B.BUNDLED_TASKS for x in get_task(t).instances]
    assert len(prompts) == 144  # 40 per task, less the two code variants the stdlib defines and the
    # 14 arith pairs whose sum has two digits
