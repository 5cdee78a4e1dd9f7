"""How the bundled model was made: builders, training stages, quality gates and the quality report.

Not part of the installed package (which ships only the model files and what reads them). Run from the
repository root with ``scripts`` on the module path: ``PYTHONPATH=scripts python -m bundled.train ...``;
``scripts/bundled/rebuild.sh`` runs every stage. The training logs are in ``logs/``.
"""
