"""Procedural data sets for offline training, distillation and scoring."""

from linfusion.data.shapes import ShapesDataset, caption, render, scene_for_seed

__all__ = ["ShapesDataset", "caption", "render", "scene_for_seed"]
