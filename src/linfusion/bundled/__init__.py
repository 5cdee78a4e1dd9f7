"""The small bundled text-to-image model (trained on the shapes data set) and its tooling.

``components`` builds its diffusers parts, ``training`` trains them resumably, ``classifier`` scores
generated images against their captions, ``evaluate`` runs the teacher's quality gates.
"""

from linfusion.bundled.components import CLASSIFIER_DIR, MODEL_DIR, build_pipeline, load_pipeline

__all__ = ["CLASSIFIER_DIR", "MODEL_DIR", "build_pipeline", "load_pipeline"]
