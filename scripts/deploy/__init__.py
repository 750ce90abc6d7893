"""MONAI Deploy pieces of the bundle: DICOM outputs (highdicom) and the operators of ``bundle/app``.

Needs the ``[deploy]`` extra (``pip install -e ".[deploy]"``); docs/deploy.md.
"""
