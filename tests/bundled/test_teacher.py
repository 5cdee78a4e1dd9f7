"""Quality gates of the committed bundled teacher (src/linfusion/bundled/model/, docs/bundled-model.md).

Rebuilt by scripts/bundled/rebuild.sh; the gates are what the committed model promises.
"""

import pytest

from bundled import evaluate
from linfusion.bundled import MODEL_DIR, load_pipeline


@pytest.fixture(scope="module")
def teacher():
    assert (MODEL_DIR / "model_index.json").exists(), (
        f"no bundled model at {MODEL_DIR}: run scripts/bundled/rebuild.sh and export it"
    )
    return load_pipeline(MODEL_DIR)


@pytest.mark.slow
def test_teacher_follows_its_prompt(teacher) -> None:
    """Prompted denoising error clearly below the unconditional one on held-out scenes."""
    errors = evaluate.conditioning_gap(teacher, n=48)
    assert errors["cond"] < 0.8 * errors["uncond"], errors
    for t in (700, 900):
        assert errors[f"cond_t{t}"] < 0.8 * errors[f"uncond_t{t}"], errors


@pytest.mark.slow
def test_teacher_draws_heldout_one_object_captions(teacher) -> None:
    """Classifier name-check: >= 80 % background colour, >= 70 % object colour and shape."""
    scores = evaluate.caption_scores(teacher, n=48, steps=20)
    assert evaluate.passes_gates(scores), scores
