"""The scoring classifier reads rendered scenes back correctly, and its scores can fail."""

import numpy as np

from linfusion.bundled import CLASSIFIER_DIR, classifier, shapes


def _heldout(n: int, start: int = 0, n_objects: int | None = None):
    return shapes.batch([shapes.split_seed(start + i, "heldout") for i in range(n)], n_objects=n_objects)


def test_committed_classifier_reads_heldout_scenes() -> None:
    """Needs the committed classifier (src/linfusion/bundled/classifier/, built by scripts/bundled)."""
    assert (CLASSIFIER_DIR / "model.safetensors").exists(), "train it: scripts/bundled/train.py classifier"
    model = classifier.load_classifier()
    images, scenes = _heldout(600)
    scores = classifier.score(images, scenes, model)
    for key in ("background", "shape", "colour", "size", "position", "count"):
        assert scores[key] >= 0.95, (key, scores)
    # one-object scenes (what the teacher's gates score), and larger renders resized to 32 px
    images, scenes = _heldout(200, start=5000, n_objects=1)
    assert min(classifier.score(images, scenes, model)[k] for k in ("background", "shape", "colour")) >= 0.97
    big = np.stack([shapes.render(scene, 64) for scene in scenes])
    assert classifier.score(big, scenes, model)["colour"] >= 0.9


def test_scores_drop_on_wrong_scenes() -> None:
    model = classifier.load_classifier()
    images, scenes = _heldout(300, start=20_000, n_objects=1)
    wrong = scenes[1:] + scenes[:1]
    right_scores = classifier.score(images, scenes, model)
    wrong_scores = classifier.score(images, wrong, model)
    for key in ("background", "shape", "colour"):
        assert wrong_scores[key] < 0.6 < right_scores[key], key
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    assert classifier.score(noise, scenes, model)["object"] < 0.3


def test_found_attributes_ignore_the_position_but_slot_attributes_do_not() -> None:
    model = classifier.load_classifier()
    scenes = [shapes.scene_for_seed(shapes.split_seed(40_000 + i, "heldout"), 1) for i in range(100)]
    images = np.stack([shapes.render(scene, 32) for scene in scenes])
    moved = []
    for scene in scenes:
        obj = scene.objects[0]
        other = shapes.POSITIONS[(shapes.POSITIONS.index(obj.position) + 1) % 3]
        moved.append(
            shapes.Scene(scene.background, (shapes.ShapeObject(obj.shape, obj.colour, obj.size, other),))
        )
    scores = classifier.score(images, moved, model)
    assert scores["found_colour"] >= 0.95 and scores["found_shape"] >= 0.95, scores
    assert scores["position"] < 0.1 and scores["shape"] < 0.1 and scores["object"] < 0.1, scores
