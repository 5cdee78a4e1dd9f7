"""LinFusion nodes for ComfyUI: clone or copy this folder into ComfyUI's ``custom_nodes/``.

Needs the ``linfusion`` package installed in ComfyUI's Python (``pip install linfusion``); ``linfusion``
itself never imports ComfyUI.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_weights_folder

register_weights_folder()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
