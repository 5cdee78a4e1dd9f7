"""``linfusion ui``: a local web page for LinFusion (needs the ``ui`` extra: ``pip install 'linfusion[ui]'``).

:mod:`.server` starts the server (the command's arguments are parsed in :mod:`linfusion.cli.ui`),
:mod:`.page` is the Gradio page, :mod:`.backend` the one object it talks to (the jobs' work, through
:mod:`linfusion.app.prepare` and :mod:`linfusion.app.execute`), :mod:`.models` the loaded models and their
planning copies, :mod:`.requests` the page's fields checked, :mod:`.planning` the plan box, :mod:`.outputs`
the files in and out, :mod:`.jobs` one job at a time on the device. Nothing heavy is imported here, so
``linfusion --help`` and ``linfusion ui --help`` load neither Gradio nor torch.
"""
