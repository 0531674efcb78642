"""Many models per process: N seeds of one config trained as one batched computation (``train.py
stack.seeds=[...]``), each member recorded exactly like its single run.

``layers``: stacked affine layers and ``stack_modules``; ``module``: the stacked method; ``data``: the members'
batches; ``records``: per-member checkpoints and history; ``run``: ``run_stacked``.
"""
