"""``linfusion ui``: a local web page for LinFusion (needs the ``ui`` extra: ``pip install 'linfusion[ui]'``).

:mod:`.server` starts the server (the command's arguments are parsed in :mod:`linfusion.cli.ui`),
:mod:`.page` is the Gradio page, :mod:`.backend` holds every call into the rest of the library,
:mod:`.jobs` runs one job at a time on the device. Nothing heavy is imported here, so ``linfusion --help``
and ``linfusion ui --help`` load neither Gradio nor torch.
"""
