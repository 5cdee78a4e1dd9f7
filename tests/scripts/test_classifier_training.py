"""Training the bundled model's classifier: a short run learns what the scenes show."""

from bundled import classifier_training
from linfusion.bundled import classifier, shapes


def _heldout(n: int, start: int = 0):
    return shapes.batch([shapes.split_seed(start + i, "heldout") for i in range(n)])


def test_a_quickly_trained_classifier_learns_background_colour_and_position() -> None:
    """Trained in the test (no artifact): the training recipe itself works."""
    config = classifier_training.ClassifierConfig(steps=120, batch_size=32, lr=3e-3, width=16)
    model = classifier_training.train_classifier(config, save=False)
    images, scenes = _heldout(300, start=30_000)
    scores = classifier.score(images, scenes, model)
    for key in ("background", "colour", "position"):
        assert scores[key] >= 0.9, scores
