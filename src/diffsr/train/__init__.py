"""Training support: HQ image datasets (`diffsr.train.data`) and training losses (`diffsr.train.losses`).

Import the submodules directly; this package imports nothing heavy. The losses need the optional
``train`` extras (``pip install diffsr[train]``: lpips, timm, torchvision).
"""
